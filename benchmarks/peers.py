"""Optional peer libraries, each used only where its op computes the same quantity.

Peers that are not installed, or that need a device this run does not have, are skipped with a
one-line note in the report. Nothing here is imported unless the peer is present: TRL, whose
import takes seconds, not before a case that runs it is built.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Callable, Dict, List, Optional, Tuple

import torch


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def liger_builders() -> Dict[str, Callable]:
    """Liger-Kernel ops keyed by the suite's op names; each builder returns a forward callable.

    * ``logprobs``: ``LigerCrossEntropyLoss(reduction="none")`` negated. Liger computes the
      gradient during its forward and stores it in the logits' storage.
    * ``divergence:forward_kl``: ``LigerKLDIVLoss(log_target=True, reduction="sum")`` fed
      with fp32 ``log_softmax`` of both inputs (it takes log-probs, not logits); ``KL(q||p)``
      with ``y_pred = log p`` and ``y_true = log q``. It returns a batch sum, not per-token values.
    * ``divergence:js``: ``LigerJSD(beta)`` fed the same way (student ``log p``, teacher
      ``log q``; its ``beta`` weights the teacher term as ours does). It returns a batch mean.
    * ``linear:logprobs``: ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` on the hidden
      states and the head, negated.
    """
    from liger_kernel.transformers import (
        LigerCrossEntropyLoss,
        LigerFusedLinearCrossEntropyLoss,
        LigerJSD,
        LigerKLDIVLoss,
    )

    def ce(case):
        loss = LigerCrossEntropyLoss(reduction="none")
        return lambda x: (-loss(x["logits"], x["labels"]),)

    def kl(case):
        loss = LigerKLDIVLoss(reduction="sum", log_target=True)

        def fwd(x):
            lp = torch.log_softmax(x["logits"].float(), dim=-1)
            lq = torch.log_softmax(x["ref_logits"].float(), dim=-1)
            return (loss(lp, lq),)
        return fwd

    def jsd(case):
        loss = LigerJSD(beta=0.5)

        def fwd(x):
            lp = torch.log_softmax(x["logits"].float(), dim=-1)
            lq = torch.log_softmax(x["ref_logits"].float(), dim=-1)
            return (loss(lp, lq),)
        return fwd

    def flce(case):
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda x: (-loss(x["weight"], x["hidden"], x["labels"]),)

    return {"logprobs": ce, "divergence:forward_kl": kl, "divergence:js": jsd,
            "linear:logprobs": flce}


def cce_builders() -> Dict[str, Callable]:
    """Apple's Cut Cross-Entropy: ``linear:logprobs`` as ``-linear_cross_entropy(hidden, W,
    labels, reduction="none")`` with its defaults (the ``cce`` kernels, which skip gradient
    blocks below ``filter_eps="auto"``)."""
    from cut_cross_entropy import linear_cross_entropy

    def logprobs(case):
        return lambda x: (-linear_cross_entropy(x["hidden"], x["weight"], x["labels"],
                                                reduction="none"),)

    return {"linear:logprobs": logprobs}


def trl_chunked_builders() -> Dict[str, Callable]:
    """TRL's chunked LM-head functions, called as TRL's trainers call them.

    * ``linear:logprobs``: ``ChunkedLogProbFunction`` with the vocabulary chunk of TRL's fused
      LM head (``add_fused_lm_head``, used by the DPO and SFT trainers), no extra outputs.
    * ``linear:terms``: the three calls that give a TRL user the same outputs: the policy's
      log-probs as above, the reference's under ``no_grad`` (as ``DPOTrainer`` scores its
      reference model), and ``ChunkedDivergenceFunction`` with ``beta=0``, TRL's forward
      ``KL(q||p)`` (as ``DistillationTrainer`` calls it).
    """

    def functions():
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def logp(hidden, weight, labels):
            return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0,
                                                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]
        return logp, ChunkedDivergenceFunction

    def logprobs(case):
        logp, _ = functions()
        return lambda x: (logp(x["hidden"], x["weight"], x["labels"]),)

    def terms(case):
        logp, divergence = functions()

        def fwd(x):
            policy = logp(x["hidden"], x["weight"], x["labels"])
            with torch.no_grad():
                ref = logp(x["ref_hidden"], x["ref_weight"], x["labels"])
            kl, _ = divergence.apply(x["hidden"], x["weight"], None, x["ref_hidden"],
                                     x["ref_weight"], None, 0.0)
            return policy, ref, kl
        return fwd

    return {"linear:logprobs": logprobs, "linear:terms": terms}


def trl_chunked(device: torch.device) -> Tuple[Optional[Dict[str, Callable]], List[str]]:
    """``(builders, notes)`` for TRL's chunked functions; ``builders`` is None without TRL."""
    if not installed("trl"):
        return None, ["TRL not installed: trl-chunked skipped."]
    how = ("tiles folded by its Triton kernels" if device.type == "cuda"
           else "tiles folded by torch ops, as its Triton kernels need a GPU")
    return trl_chunked_builders(), [
        f"trl-chunked (TRL {importlib.metadata.version('trl')}; {how}): "
        "linear:logprobs is ChunkedLogProbFunction as TRL's fused LM head calls it (its "
        "vocabulary chunk, no extra outputs); linear:terms is what a TRL user runs for the same "
        "three outputs, as TRL has no one function giving them: ChunkedLogProbFunction for the "
        "policy, again under no_grad for the reference (as DPOTrainer scores it), and "
        "ChunkedDivergenceFunction with beta=0 for KL(q||p) (as DistillationTrainer calls it)."]


def available_peers(device: torch.device) -> Tuple[Dict[str, Dict[str, Callable]], List[str]]:
    """``({peer_name: {op: builder}}, notes)`` for the peers usable on ``device``."""
    peers: Dict[str, Dict[str, Callable]] = {}
    notes: List[str] = []
    if not installed("liger_kernel"):
        notes.append("Liger-Kernel not installed: skipped.")
    elif device.type != "cuda":
        notes.append("Liger-Kernel: skipped (its Triton kernels need a CUDA device).")
    else:
        try:
            peers["liger"] = liger_builders()
        except Exception as exc:  # an incompatible release: report it, keep benchmarking
            notes.append(f"Liger-Kernel present but unusable ({type(exc).__name__}: {exc}): skipped.")
    if not installed("cut_cross_entropy"):
        notes.append("Cut Cross-Entropy not installed: skipped (it takes hidden states and the "
                     "head, never logits: linear:logprobs only).")
    elif device.type != "cuda":
        notes.append("Cut Cross-Entropy: skipped (its Triton kernels need a CUDA device).")
    else:
        try:
            peers["cce"] = cce_builders()
            notes.append("cce: linear:logprobs only (it takes hidden states and the head, never "
                         "logits); its default gradient filtering (filter_eps='auto') skips "
                         "blocks of near-zero gradient.")
        except Exception as exc:
            notes.append(f"Cut Cross-Entropy present but unusable ({type(exc).__name__}: "
                         f"{exc}): skipped.")
    return peers, notes
