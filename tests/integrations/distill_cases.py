"""What the distillation trainer tests share: a tiny student and a wider teacher over the
WordLevel vocabulary of trl_cases.py, prompts, plain-SGD configs and a gradient recorder."""

from __future__ import annotations

import copy

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from trl_cases import WORDS

PROMPTS = ["w1 w2", "w3", "w4 w5 w6", "w7"]


def word_llama(hidden: int, seed: int, **extra) -> LlamaForCausalLM:
    """A tiny fp32 Llama over ``WORDS`` with hidden size ``hidden``; ``extra`` set on its config."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    for name, value in extra.items():
        setattr(config, name, value)
    return LlamaForCausalLM(config)


def student_and_teacher(student_extra=None, teacher_extra=None):
    """A student (hidden 16) and a teacher (hidden 24, biased head) of different configs."""
    student = word_llama(16, seed=0, **(student_extra or {}))
    teacher = word_llama(24, seed=1, **(teacher_extra or {}))
    head = torch.nn.Linear(24, len(WORDS), bias=True)
    with torch.no_grad():
        head.weight.copy_(teacher.lm_head.weight)
        head.bias.copy_(torch.linspace(-1.0, 1.0, len(WORDS)))
    teacher.lm_head = head
    return student, teacher


def prompt_dataset():
    return datasets.Dataset.from_dict({"prompt": PROMPTS})


def distill_args(config_class, output_dir, steps=3, **kwargs):
    # Plain SGD, constant lr: the parameters are a deterministic function of the gradients.
    options = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
                   optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                   bf16=False, save_strategy="no", seed=0, disable_tqdm=True, max_completion_length=5,
                   gradient_checkpointing=False, temperature=0.7)
    options.update(kwargs)
    return config_class(**options)


class GradientRecorder(TrainerCallback):
    """Clones every parameter's gradient before each optimizer step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: None if p.grad is None else p.grad.detach().clone()
                           for name, p in model.named_parameters()})


def train(trainer_class, args, student, teacher, tokenizer, **kwargs):
    """Train copies of ``student`` and ``teacher``; return (log history, recorded gradients, final parameters)."""
    recorder = GradientRecorder()
    torch.manual_seed(0)
    trainer = trainer_class(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=args,
                            train_dataset=prompt_dataset(), processing_class=tokenizer, callbacks=[recorder],
                            **kwargs)
    trainer.train()
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer.state.log_history, recorder.steps, params
