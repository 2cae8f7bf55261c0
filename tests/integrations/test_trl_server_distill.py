"""``PrefOptServerDistillationTrainer`` against TRL 1.16's ``ServerDistillationTrainer``.

No server: ``VLLMClient`` is replaced by a teacher emulated in-process, a tiny Llama whose tempered
log-softmax gives each completion token's top-k ids and log-probs and the sampled token's log-prob,
as the server returns them. Three plain-SGD steps of stock and ours from the same student, prompts
and seed; logged losses and the gradient norm agree to ``rel=1e-5``, each step's gradients to
``1e-5 * max|g|`` per parameter. Cases: forward KL on the top-4 with and without the tail bucket,
and TRL's top-1 support for generalised JSD and reverse KL. The emulated teacher's supports keep a
tail above 1e-3, so stock's ``log(1 - sum exp)`` in fp32 is accurate to the tolerance.
Skipped without TRL (or transformers).
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402
from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer  # noqa: E402

from distill_cases import GradientRecorder, distill_args, prompt_dataset, word_llama  # noqa: E402
from prefopt_kernels.integrations.trl_server_distill import PrefOptServerDistillationTrainer  # noqa: E402
from trl_cases import make_tokenizer  # noqa: E402

TEACHER = word_llama(24, seed=1)


class EmulatedTeacherClient:
    """``VLLMClient.get_sequence_logprobs`` answered by ``TEACHER`` in-process."""

    def __init__(self, *args, **kwargs):
        self.calls = 0

    @torch.no_grad()
    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0, **kwargs):
        self.calls += 1
        result = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [], "actual_token_ids": []}
        for sequence, prompt_length in zip(sequences, prompt_lengths):
            ids = torch.tensor([sequence])
            logp = (TEACHER(ids).logits[0].double() / temperature).log_softmax(-1).float()
            top, rows, actual = [], [], []
            for position in range(prompt_length, len(sequence)):
                values, indices = logp[position - 1].topk(top_logprobs)
                top.append(values.tolist())
                rows.append(indices.tolist())
                actual.append([logp[position - 1, sequence[position]].item()])
            result["logprobs"].append(top)
            result["logprob_token_ids"].append(rows)
            result["actual_logprobs"].append(actual)
            result["actual_token_ids"].append([[token] for token in sequence[prompt_length:]])
        return result


CASES = {
    "forward_kl_top4_tail": dict(beta=0.0, loss_top_k=4),
    "forward_kl_top4_no_tail": dict(beta=0.0, loss_top_k=4, loss_add_tail=False),
    "jsd_top1": dict(beta=0.4, loss_top_k=1),
    "reverse_kl_top1": dict(beta=1.0, loss_top_k=1),
}


def _train(trainer_class, tmp_path, options, student):
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    args = distill_args(ServerDistillationConfig, tmp_path / trainer_class.__name__,
                        teacher_model_server_url="http://emulated", **options)
    recorder = GradientRecorder()
    torch.manual_seed(0)
    trainer = trainer_class(model=copy.deepcopy(student), args=args, train_dataset=prompt_dataset(),
                            processing_class=tokenizer, callbacks=[recorder])
    trainer.train()
    assert trainer.teacher_client.calls == 3
    return trainer.state.log_history, recorder.steps


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_stock_server_distillation(tmp_path, monkeypatch, case):
    monkeypatch.setattr("trl.generation.vllm_client.VLLMClient", EmulatedTeacherClient)
    student = word_llama(16, seed=0)
    stock_logs, stock_grads = _train(ServerDistillationTrainer, tmp_path, CASES[case], student)
    our_logs, our_grads = _train(PrefOptServerDistillationTrainer, tmp_path, CASES[case], student)
    for theirs, mine in zip(stock_logs[:3], our_logs[:3]):
        assert mine["loss"] > 0
        for key in ("loss", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
    assert len(stock_grads) == len(our_grads) == 3
    for theirs, mine in zip(stock_grads, our_grads):
        for name, g in theirs.items():
            scale = g.abs().max().item()
            assert (mine[name] - g).abs().max().item() <= 1e-5 * scale + 1e-12, name
