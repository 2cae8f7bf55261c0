"""The benchmark suite of prefopt_kernels: ``python -m benchmarks`` (see ``__main__``).

``cases`` says what is measured and how many bytes it must move, ``eager`` and ``peers`` hold
the baselines, ``runner`` times cases and measures their memory, ``report`` writes the
results (JSON, markdown, PNG).
"""
