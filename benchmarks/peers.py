"""Optional peer libraries, each used only where its op computes the same quantity.

Peers that are not installed, or that need a device this run does not have, are skipped with a
one-line note in the report. Nothing here is imported unless the peer is present.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, List, Tuple

import torch


def _installed(module: str) -> bool:
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
    """
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss

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

    return {"logprobs": ce, "divergence:forward_kl": kl, "divergence:js": jsd}


def available_peers(device: torch.device) -> Tuple[Dict[str, Dict[str, Callable]], List[str]]:
    """``({peer_name: {op: builder}}, notes)`` for the peers usable on ``device``."""
    peers: Dict[str, Dict[str, Callable]] = {}
    notes: List[str] = []
    if not _installed("liger_kernel"):
        notes.append("Liger-Kernel not installed: skipped.")
    elif device.type != "cuda":
        notes.append("Liger-Kernel: skipped (its Triton kernels need a CUDA device).")
    else:
        try:
            peers["liger"] = liger_builders()
        except Exception as exc:  # an incompatible release: report it, keep benchmarking
            notes.append(f"Liger-Kernel present but unusable ({type(exc).__name__}: {exc}): skipped.")
    if _installed("cut_cross_entropy"):
        notes.append("Cut Cross-Entropy: not comparable here (it fuses the classifier matmul and "
                     "takes hidden states and weights, never pre-computed logits): skipped.")
    else:
        notes.append("Cut Cross-Entropy not installed: skipped (and it has no logits-input API "
                     "to compare like for like).")
    return peers, notes
