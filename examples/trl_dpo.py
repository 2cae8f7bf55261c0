"""TRL's DPO trainer with the losses of prefopt_kernels: SparsePO, then a sigmoid + SFT mix.

    python examples/trl_dpo.py [--steps 5] [--output-dir DIR]

Everything is built in code and nothing is downloaded: a tiny randomly initialised
``LlamaForCausalLM``, a word-level tokenizer over a made-up vocabulary, and a few dozen
synthetic preference pairs (chosen answers carry "good" words, rejected ones "bad" words).
The same starting model is trained twice for a few steps with ``PrefOptDPOTrainer``:

1. ``loss_type="sparse_po"``: SparsePO with a learned token mask (a small network over the
   reference's hidden states, trained with the policy, with an L1 penalty pushing both the
   reward mask and the KL mask towards sparsity). The policy's and the reference's
   log-probabilities and the per-token KL come from one fused pass over both models' hidden
   states; neither model's logits are materialised. Logs SparsePO's own metrics
   (``kl/chosen``, ``mask/density``, ...) next to TRL's.
2. ``loss_type=["sigmoid", "sft"]`` with ``loss_weights``: TRL's own weighted mix of the DPO
   loss and an SFT term on the chosen answers, run by TRL's code unchanged on our fused LM
   head (which ``PrefOptDPOTrainer`` installs on the policy and the reference).

Each run prints one line per optimizer step. Needs the ``[trl]`` extra (``transformers``,
``trl``; ``datasets`` and ``tokenizers`` come with them). Takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import random
import tempfile

import datasets
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from transformers.trainer_callback import PrinterCallback

import prefopt_kernels as pk
from prefopt_kernels.integrations.trl_dpo import PrefOptDPOConfig, PrefOptDPOTrainer

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
GOOD_WORDS = ["good", "great", "helpful", "clear", "kind", "correct", "honest", "useful"]
BAD_WORDS = ["bad", "wrong", "rude", "vague", "harmful", "false", "useless", "sloppy"]
FILLER_WORDS = [f"word{i}" for i in range(40)]
VOCABULARY = SPECIAL_TOKENS + GOOD_WORDS + BAD_WORDS + FILLER_WORDS

# The two runs: the trainer's loss options, and the metrics printed at every step.
RUNS = {
    "sparse_po": dict(
        loss=dict(loss_type="sparse_po", sparse_po_mask="learned", sparse_po_separate_kl_mask=True,
                  sparse_po_l1_reward=1e-3, sparse_po_l1_kl=1e-3),
        # The masks start near 1 on every token (SparsePO starts as TDPO). mask/density counts the
        # tokens whose reward mask is non-zero; the masks' mean values (*_mean) move first.
        columns=("loss", "rewards/margins", "rewards/accuracies", "kl/chosen", "kl/rejected",
                 "mask/density", "mask/reward_mean", "mask/kl_mean"),
    ),
    "sigmoid+sft": dict(
        loss=dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]),
        columns=("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                 "mean_token_accuracy"),
    ),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``VOCABULARY``, built in memory."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCABULARY)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A two-layer Llama with random weights (about 80k parameters)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCABULARY), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def build_dataset(num_pairs: int = 48, seed: int = 0) -> datasets.Dataset:
    """Prompt / chosen / rejected text: both answers are filler, with "good" or "bad" words mixed in."""
    rng = random.Random(seed)

    def answer(marker_words):
        words = rng.choices(FILLER_WORDS, k=rng.randint(4, 8))
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(marker_words))
        # TRL appends the completion to the prompt as text, so it starts with a space.
        return " " + " ".join(words)

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(num_pairs):
        rows["prompt"].append(" ".join(rng.choices(FILLER_WORDS, k=rng.randint(3, 6))))
        rows["chosen"].append(answer(GOOD_WORDS))
        rows["rejected"].append(answer(BAD_WORDS))
    return datasets.Dataset.from_dict(rows)


class PrintStepMetrics(TrainerCallback):
    """Prints the chosen metrics of every logged step as one table row, and keeps the logs."""

    def __init__(self, columns):
        self.columns = columns
        self.history = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.widths = [max(len(name), 9) for name in self.columns]
        print("step " + " ".join(f"{name:>{width}}" for name, width in zip(self.columns, self.widths)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:  # the end-of-training summary
            return
        self.history.append(dict(logs))
        print(f"{state.global_step:4d} "
              + " ".join(f"{logs[name]:{width}.4f}" for name, width in zip(self.columns, self.widths)))


def train(run_name: str, steps: int, output_dir: str) -> list[dict]:
    """Trains a fresh tiny Llama for ``steps`` steps with the run's loss; returns the per-step logs."""
    run = RUNS[run_name]
    tokenizer = build_tokenizer()
    policy = build_model(tokenizer)
    reference = copy.deepcopy(policy)  # the policy starts as the reference
    args = PrefOptDPOConfig(
        output_dir=os.path.join(output_dir, run_name.replace("+", "_")),
        max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3, beta=0.1,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        # TRL's defaults (bf16, activation checkpointing) are for large models; this one needs neither.
        bf16=False, gradient_checkpointing=False,
        **run["loss"],
    )
    loss_type = run["loss"]["loss_type"]
    print(f"\n== loss_type={loss_type!r}" + (f", loss_weights={args.loss_weights}" if args.loss_weights else ""))
    printer = PrintStepMetrics(run["columns"])
    trainer = PrefOptDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=build_dataset(),
                                processing_class=tokenizer, callbacks=[printer])
    trainer.remove_callback(PrinterCallback)  # our table replaces the raw log dicts
    trainer.train()
    return printer.history


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--output-dir", default=None,
                        help="where the trainers write (default: a temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    print(f"prefopt_kernels backends available: {', '.join(pk.available_backends())}")

    output_dir = (contextlib.nullcontext(args.output_dir) if args.output_dir
                  else tempfile.TemporaryDirectory(prefix="trl_dpo_example_"))
    with output_dir as path:
        results = {name: train(name, args.steps, path) for name in RUNS}

    for name, history in results.items():
        losses = [logs["loss"] for logs in history]
        status = "finite" if all(math.isfinite(x) for x in losses) else "NOT FINITE"
        print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps ({status})")
    return results


if __name__ == "__main__":
    main()
