"""``chunked_sparse_teacher_loss`` against TRL 1.16's async distillation ``_chunked_jsd_loss`` on the
same inputs: all five returned values (``rel=1e-5``) and the gradients of the student's hidden
states, head weight and bias (``1e-5 * max|g|``), for TRL's wide top-k support at ``beta = 0``
and its top-1 plus sampled-token support at ``beta = 0.4`` and ``1``, with and without the tail,
two teachers. The trainer itself needs rollout workers and is not run here; that
``use_in_async_distillation`` rebinds the function the trainer calls is checked.
Skipped without TRL (or transformers).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402

import trl.experimental.async_distillation.async_distillation_trainer as trl_async  # noqa: E402
from prefopt_kernels.integrations import trl_async_distill  # noqa: E402

STOCK_LOSS = trl_async._chunked_jsd_loss


def _inputs(beta, seed=0, tokens=23, vocab=311, hidden=16, k=6):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    b = torch.randn(vocab, generator=g) * 0.3
    teacher = (torch.randn(tokens, vocab, generator=g) * 2).log_softmax(-1)
    top_lp, top_ids = teacher.topk(k, dim=-1)
    actual = torch.randint(0, vocab, (tokens,), generator=g)
    actual[::3] = top_ids[::3, 0]  # some sampled tokens are the top-1
    # As vLLM's prompt_logprobs: the sampled token is among the reported candidates.
    top_ids[:, -1] = torch.where((top_ids[:, :-1] == actual[:, None]).any(-1), top_ids[:, -1], actual)
    top_lp[:, -1] = teacher.gather(-1, top_ids[:, -1:]).squeeze(-1)
    top_ids[5, 3:] = -1  # a position with fewer candidates
    top_lp[5, 3:] = float("-inf")
    valid = top_ids != -1
    if beta == 0.0:
        ids, lps, mask = top_ids, top_lp, valid
    else:
        ids, lps, mask = trl_async._narrow_top1_actual_support(top_ids[None], top_lp[None], actual[None],
                                                               valid[None], beta)
        ids, lps, mask = ids[0], lps[0], mask[0]
    teacher_idx = torch.randint(0, 2, (tokens,), generator=g)
    return h, w, b, ids, lps, mask, teacher_idx


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_matches_stock_chunked_jsd_loss(beta, tail):
    h, w, b, ids, lps, mask, teacher_idx = _inputs(beta)
    results, grads = [], []
    for loss_fn in (STOCK_LOSS, trl_async_distill.chunked_sparse_teacher_loss):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        out = loss_fn(leaves[0], leaves[1], leaves[2], 1.3, 4.0, ids, lps, mask, beta, 0.9, tail, teacher_idx, 2, 8)
        out[0].backward()
        results.append([x.detach() for x in out])
        grads.append([x.grad for x in leaves])
    (stock, ours), (stock_grads, our_grads) = results, grads
    for name, theirs, mine in zip(("loss", "jsd_sum", "entropy_sum", "teacher_entropy_sum", "per_teacher"),
                                  stock, ours):
        assert mine.shape == theirs.shape, name
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
    # Reverse KL on the sampled token alone, renormalised without a tail, is 0 for every token.
    assert stock[0] > 0 or (beta == 1.0 and not tail)
    for theirs, mine in zip(stock_grads, our_grads):
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_use_in_async_distillation_rebinds_the_trainer_loss(monkeypatch):
    monkeypatch.setattr(trl_async, "_chunked_jsd_loss", STOCK_LOSS)
    trl_async_distill.use_in_async_distillation()
    assert trl_async._chunked_jsd_loss is trl_async_distill.chunked_sparse_teacher_loss
