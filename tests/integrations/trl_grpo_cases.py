"""What the ``PrefOptGRPOTrainer`` tests share (test_trl_grpo.py, test_trl_grpo_sampler.py): the
tiny policy saved where GRPO can load its reference from, four prompts, a reward that varies
across completions, plain-SGD training arguments, and the construction of a trainer. Every test
module skips without TRL before importing it.
"""

from __future__ import annotations

import datasets
import pytest
import torch

from trl_cases import make_tokenizer, make_word_llama

PROMPTS = ["w1 w2", "w3", "w4 w5 w6", "w7"]
TEMPERATURE = 0.7


def reward(completions, **kwargs):
    """A reward that varies across completions, so that advantages (hence losses) are non-zero."""
    return [float(sum(map(ord, text)) % 7) for text in completions]


def grpo_args(config_class, output_dir, steps=3, **kwargs):
    # Plain SGD, constant lr: the parameters are a deterministic function of the gradients.
    options = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
                   optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                   bf16=False, save_strategy="no", seed=0, disable_tqdm=True, num_generations=2,
                   max_completion_length=4, beta=0.1, temperature=TEMPERATURE)
    options.update(kwargs)
    return config_class(**options)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """The tiny policy saved to a directory: GRPO loads its reference (beta > 0) from the policy's name."""
    path = tmp_path_factory.mktemp("grpo_policy")
    make_word_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def build(trainer_class, args, policy_dir):
    """``trainer_class`` on the policy saved in ``policy_dir`` (its reference loaded from there too)."""
    torch.manual_seed(0)
    return trainer_class(model=str(policy_dir), reward_funcs=reward, args=args,
                         train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                         processing_class=make_tokenizer())
