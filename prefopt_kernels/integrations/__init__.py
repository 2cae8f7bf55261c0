"""Drop-ins for the trainers our users run; each submodule imports its framework lazily."""
