"""``PreferenceLoss``: a TRL-style stacked batch of logits to loss and metrics in one call."""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..checks import check_ignore_index
from .common import check_positive, sequence_sum
from .dpo import DPO_LOSS_TYPES, dpo_loss
from .inpo import inpo_loss
from .simpo import simpo_loss
from .sparse_po import kl_row_selector, sparse_po_loss
from .tdpo import tdpo_loss

# Losses that need the per-token KL (and therefore reference logits, not log-probs).
_KL_LOSSES = ("tdpo1", "tdpo2", "sparse_po")
PREFERENCE_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "inpo") + _KL_LOSSES
# Keyword arguments of the loss functions that PreferenceLoss fills in itself.
_SET_BY_MODULE = frozenset({
    "beta", "loss_type", "variant", "chosen_lengths", "rejected_lengths", "chosen_mask",
    "rejected_mask", "chosen_cu_seqlens", "rejected_cu_seqlens",
})


def _loss_function(loss_type):
    if isinstance(loss_type, list):  # a weighted mix: DPOTrainer loss types only
        return dpo_loss
    if loss_type in ("tdpo1", "tdpo2"):
        return tdpo_loss
    return {"sparse_po": sparse_po_loss, "simpo": simpo_loss, "inpo": inpo_loss}.get(loss_type, dpo_loss)


def _check_loss_type(loss_type):
    """``loss_type`` as a str, or as a list for a mix of DPOTrainer loss types (TRL's form)."""
    if isinstance(loss_type, (list, tuple)):
        bad = [lt for lt in loss_type if not isinstance(lt, str) or lt not in DPO_LOSS_TYPES]
        if not loss_type or bad:
            raise ValueError(
                f"a list loss_type mixes DPOTrainer loss types {DPO_LOSS_TYPES}; got {list(loss_type)}"
            )
        return list(loss_type)
    if not isinstance(loss_type, str) or loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is unknown; expected one of {PREFERENCE_LOSS_TYPES}")
    return loss_type


def _check_loss_kwargs(loss_type, kwargs: dict) -> None:
    """Unknown, module-owned or missing required ``loss_kwargs`` fail at construction, not in forward."""
    fn = _loss_function(loss_type)
    params = {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    allowed = sorted(set(params) - _SET_BY_MODULE)
    for key in kwargs:
        if key in _SET_BY_MODULE and key in params:
            raise TypeError(f"loss_kwargs must not set {key!r}: PreferenceLoss passes it to {fn.__name__}")
        if key not in params:
            raise TypeError(
                f"loss_type {loss_type!r} ({fn.__name__}) takes no argument {key!r}; "
                f"loss_kwargs may set {allowed}"
            )
    missing = [n for n in allowed if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise TypeError(f"loss_type {loss_type!r} needs loss_kwargs {missing}")


def _check_float_tensor(name: str, x, device) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")
    if x.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {x.device}")


class PreferenceLoss(nn.Module):
    r"""Preference loss from a stacked batch: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.

    ``forward(logits, labels, ref_logits=None, *, ref_logps=None, reward_mask=None,
    kl_mask=None, prev_logps=None) -> (loss, metrics)``

    * ``logits`` ``[2B, T, V]`` (fp32/bf16/fp16) of the policy, with gradient.
    * ``labels`` ``[2B, T]`` integer, ``ignore_index`` (default -100) on prompt and padding.
      With ``shift_labels=True`` they are the unshifted input ids: the op reads the view
      ``logits[:, :-1]`` (no copy) against ``labels[:, 1:]``.
    * ``ref_logits`` ``[2B, T, V]`` of the reference, or ``ref_logps``: precomputed
      reference log-probs, per sequence ``[2B]`` or per token (labels' shape). The token-level
      losses (``tdpo1``, ``tdpo2``, ``sparse_po``) need ``ref_logits``: their KL is a sum over
      the vocabulary.
    * ``reward_mask`` / ``kl_mask``: ``sparse_po``'s token masks in the labels' layout
      (sliced ``[:, 1:]`` like the labels when ``shift_labels``); None means all ones.
    * ``prev_logps`` ``[2B]``: per-sequence log-probs of the previous iterate (``inpo``).

    With reference logits and a token-level loss, one call of ``pk.token_terms`` reads each
    row of both logits once and returns the policy's and the reference's label log-probs and
    the forward KL ``KL(π_ref ‖ π)`` per token; where a KL mask that carries no gradient is 0
    the divergence is not even computed. A KL mask that requires grad gets the KL at every
    valid token: its gradient there is ``±c KL_t`` even where it is 0 (:func:`sparse_po_loss`).
    Other losses use ``pk.token_logprobs`` (the reference's under no_grad).
    Sequence log-probs are sums over the tokens whose label is not ``ignore_index``; those
    counts are the lengths of ``ipo``, ``sigmoid_norm``, ``sft`` and ``simpo`` (a row without
    such a token has length 0, which ``dpo_loss`` and ``simpo`` take as 1, as TRL does).

    ``loss_type`` is any of :data:`PREFERENCE_LOSS_TYPES`, or a list of DPOTrainer loss types
    (:data:`DPO_LOSS_TYPES`) combined with ``loss_weights``, as TRL's ``loss_type=[...]``;
    ``beta`` and ``loss_kwargs`` go to the loss function (e.g. ``label_smoothing``,
    ``loss_weights``, ``f_divergence_type``, ``gamma``, ``alpha``, ``l1_reward``,
    ``eta``/``tau`` for ``inpo``, whose ``beta`` is unused). ``metrics`` are those of the loss
    plus ``logps/chosen``, ``logps/rejected`` (summed policy log-probs) where the loss does not
    report them.

    Checks, each an error naming the argument: at construction, ``beta`` and ``temperature``
    (finite real scalars > 0: Python or numpy numbers, 0-d tensors), ``ignore_index`` (an
    int in the int64 range), ``shift_labels`` (bool) and ``loss_kwargs`` (only the loss
    function's own keyword arguments, with every required one, e.g. ``inpo``'s
    ``eta``/``tau``); in ``forward``, at
    least one pair (``2B >= 2``), every tensor's shape and device against the logits' and
    labels', and the arguments a loss type does not use (``reward_mask``/``kl_mask`` outside
    ``sparse_po``, ``prev_logps`` outside ``inpo``) — never ignored silently.
    """

    def __init__(
        self,
        loss_type: Union[str, Sequence[str]] = "sigmoid",
        *,
        beta: float = 0.1,
        ignore_index: int = -100,
        shift_labels: bool = False,
        temperature: float = 1.0,
        inplace_backward: bool = False,
        **loss_kwargs,
    ):
        super().__init__()
        loss_type = _check_loss_type(loss_type)
        check_ignore_index(ignore_index)
        if not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be a bool, got {shift_labels!r}")
        _check_loss_kwargs(loss_type, loss_kwargs)
        self.loss_type = loss_type
        self.beta = check_positive("beta", beta)
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.temperature = check_positive("temperature", temperature)
        self.inplace_backward = inplace_backward
        self.loss_kwargs = loss_kwargs

    def _token_arg(self, name: str, x, full_shape, device) -> torch.Tensor:
        """A labels-layout tensor, checked, then sliced the way the labels are sliced.

        Its shape is the labels' (or, with ``shift_labels``, already the shifted one).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex():
            raise TypeError(f"{name} must be a bool, integer or real tensor, got {x.dtype}")
        shifted = (full_shape[0], full_shape[1] - 1)
        if tuple(x.shape) == tuple(full_shape):
            x = x[:, 1:] if self.shift_labels else x
        elif not (self.shift_labels and tuple(x.shape) == shifted):
            also = f" (or the shifted {shifted})" if self.shift_labels else ""
            raise ValueError(
                f"{name} must have the labels' shape {tuple(full_shape)}{also}, got {tuple(x.shape)}"
            )
        if x.device != device:
            raise ValueError(f"{name} must be on the logits' device {device}, got {x.device}")
        return x

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ref_logits: Optional[torch.Tensor] = None,
        *,
        ref_logps: Optional[torch.Tensor] = None,
        reward_mask: Optional[torch.Tensor] = None,
        kl_mask: Optional[torch.Tensor] = None,
        prev_logps: Optional[torch.Tensor] = None,
    ):
        from ..ops import token_logprobs, token_terms

        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise ValueError(f"logits must be [2B, T, V], got {getattr(logits, 'shape', logits)}")
        if logits.shape[0] == 0:
            raise ValueError(
                f"logits must hold at least one pair (2B >= 2 rows); got shape {tuple(logits.shape)}"
            )
        if logits.shape[0] % 2:
            raise ValueError(f"logits must stack chosen then rejected rows: 2B rows, got {logits.shape[0]}")
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"labels must be [2B, T] = {tuple(logits.shape[:2])} like the logits, "
                f"got {getattr(labels, 'shape', labels)}"
            )
        if (ref_logits is None) == (ref_logps is None) and self.loss_type != "simpo":
            raise ValueError("give exactly one of ref_logits and ref_logps")
        if self.loss_type in _KL_LOSSES and ref_logits is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs ref_logits (its KL sums over the vocabulary)")
        if ref_logits is not None and (
            not isinstance(ref_logits, torch.Tensor) or ref_logits.shape != logits.shape
        ):
            raise ValueError(
                f"ref_logits must have the logits' shape {tuple(logits.shape)}, "
                f"got {getattr(ref_logits, 'shape', ref_logits)}"
            )
        owners = (("reward_mask", reward_mask, "sparse_po"), ("kl_mask", kl_mask, "sparse_po"),
                  ("prev_logps", prev_logps, "inpo"))
        for name, value, owner in owners:
            if value is not None and self.loss_type != owner:
                raise ValueError(f"{name} is only used by loss_type {owner!r}, not {self.loss_type!r}")
        n_rows = logits.shape[0]
        full_labels_shape = tuple(labels.shape)
        if reward_mask is not None:
            reward_mask = self._token_arg("reward_mask", reward_mask, full_labels_shape, logits.device)
        if kl_mask is not None:
            kl_mask = self._token_arg("kl_mask", kl_mask, full_labels_shape, logits.device)
        if ref_logps is not None:
            _check_float_tensor("ref_logps", ref_logps, logits.device)
            if ref_logps.dim() == 1:
                if ref_logps.shape[0] != n_rows:
                    raise ValueError(
                        f"ref_logps must be [2B] = [{n_rows}] per sequence or the labels' shape "
                        f"{full_labels_shape} per token, got {tuple(ref_logps.shape)}"
                    )
            else:
                ref_logps = self._token_arg("ref_logps", ref_logps, full_labels_shape, logits.device)
        if self.loss_type == "inpo":
            if prev_logps is None:
                raise ValueError("loss_type 'inpo' needs prev_logps ([2B] previous-iterate log-probs)")
            _check_float_tensor("prev_logps", prev_logps, logits.device)
            if tuple(prev_logps.shape) != (n_rows,):
                raise ValueError(f"prev_logps must be [2B] = [{n_rows}], got {tuple(prev_logps.shape)}")
        if self.shift_labels:
            logits = logits[:, :-1]  # a view: the vocabulary stays contiguous, nothing is copied
            labels = labels[:, 1:]
            if ref_logits is not None:
                ref_logits = ref_logits[:, :-1]

        is_valid = labels != self.ignore_index
        valid = is_valid.to(torch.float32)
        common = dict(ignore_index=self.ignore_index, temperature=self.temperature,
                      inplace_backward=self.inplace_backward)
        div = None
        if self.loss_type in _KL_LOSSES:
            # where, not a product: the mask may hold garbage (inf/NaN) at ignored tokens.
            selector = kl_row_selector(kl_mask)
            div_weight = None if selector is None else torch.where(is_valid, selector.float(), 0.0)
            terms = token_terms(logits, labels, ref_logits, divergence="forward_kl", div_weight=div_weight, **common)
            logp, ref_tok, div = terms.logp, terms.ref_logp, terms.div
        else:
            logp = token_logprobs(logits, labels, **common)
            if ref_logits is not None and self.loss_type != "simpo":
                with torch.no_grad():
                    ref_tok = token_logprobs(ref_logits, labels, ignore_index=self.ignore_index,
                                             temperature=self.temperature)
            else:
                ref_tok = ref_logps

        n = logits.shape[0] // 2
        seq_logps = sequence_sum(logp, valid)
        lengths = valid.sum(dim=1)
        metrics_logps = {"logps/chosen": seq_logps[:n].detach().mean(),
                         "logps/rejected": seq_logps[n:].detach().mean()}

        if self.loss_type in _KL_LOSSES:
            logratios = logp - ref_tok
            v_w, v_l = valid[:n], valid[n:]
            if self.loss_type == "sparse_po":
                um = (None, None) if reward_mask is None else (reward_mask[:n], reward_mask[n:])
                km = (None, None) if kl_mask is None else (kl_mask[:n], kl_mask[n:])
                loss, metrics = sparse_po_loss(
                    logratios[:n], logratios[n:], div[:n], div[n:], um[0], um[1], km[0], km[1],
                    chosen_mask=v_w, rejected_mask=v_l, beta=self.beta, **self.loss_kwargs)
            else:
                loss, metrics = tdpo_loss(
                    logratios[:n], logratios[n:], div[:n], div[n:], v_w, v_l, beta=self.beta,
                    variant=1 if self.loss_type == "tdpo1" else 2, **self.loss_kwargs)
        elif self.loss_type == "simpo":
            # A row without a kept label has log-prob 0; its length is taken as 1, as dpo_loss does.
            simpo_lengths = lengths.clamp(min=1)
            loss, metrics = simpo_loss(seq_logps[:n], seq_logps[n:], simpo_lengths[:n], simpo_lengths[n:],
                                       beta=self.beta, **self.loss_kwargs)
        else:
            ref_seq = ref_tok if ref_tok.dim() == 1 else sequence_sum(ref_tok.to(torch.float32), valid)
            ref_seq = ref_seq.detach()
            if self.loss_type == "inpo":
                loss, metrics = inpo_loss(seq_logps[:n], seq_logps[n:], ref_seq[:n], ref_seq[n:],
                                          prev_logps[:n].detach(), prev_logps[n:].detach(), **self.loss_kwargs)
            else:
                loss, metrics = dpo_loss(seq_logps[:n], seq_logps[n:], ref_seq[:n], ref_seq[n:],
                                         beta=self.beta, loss_type=self.loss_type,
                                         chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
                                         **self.loss_kwargs)
        for key, value in metrics_logps.items():
            metrics.setdefault(key, value)
        return loss, metrics
