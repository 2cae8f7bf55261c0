"""``PreferenceLoss``: a TRL-style stacked batch of logits to loss and metrics in one call."""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..checks import check_ignore_index
from .common import check_positive, sequence_sum
from .registry import LOSSES, LossEntry, entries_reading, loss_entry, stacked_token_inputs
from .sparse_po import kl_row_selector

# The paired loss types registered at import, the ones PreferenceLoss takes; a loss registered later
# is accepted too (the registry is read per call). Unpaired ones (KTO) are kto_loss's.
PREFERENCE_LOSS_TYPES = tuple(name for name, entry in LOSSES.items() if entry.paired)
# Keyword arguments that PreferenceLoss fills in itself, besides an entry's inputs and options.
_SET_BY_MODULE = frozenset({"beta", "chosen_cu_seqlens", "rejected_cu_seqlens"})


def _check_loss_kwargs(entry: LossEntry, loss_type, kwargs: dict) -> None:
    """Unknown, module-owned or missing required ``loss_kwargs`` fail at construction, not in forward."""
    fn = entry.function
    params = {p.name: p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in entry.inputs}
    owned = (_SET_BY_MODULE | set(entry.options)) & set(params)
    allowed = sorted(set(params) - owned)
    for key in kwargs:
        if key in owned:
            raise TypeError(f"loss_kwargs must not set {key!r}: PreferenceLoss passes it to {fn.__name__}")
        if key not in params:
            raise TypeError(
                f"loss_type {loss_type!r} ({fn.__name__}) takes no argument {key!r}; "
                f"loss_kwargs may set {allowed}"
            )
    missing = [n for n in allowed if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise TypeError(f"loss_type {loss_type!r} needs loss_kwargs {missing}")


def _owners(names) -> str:
    return " or ".join(repr(name) for name in names)


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
    counts are the lengths (of ``ipo``, ``sigmoid_norm``, ``sft``, ``simpo``, ``orpo``, the
    ``cpo`` types; a row without such a token has length 0, which ``dpo_loss`` takes as 1, as TRL
    does, and the reference-free losses are given as 1: ``LossEntry.min_length``).

    What a loss type reads and whether it needs a reference or the KL is its entry in
    :data:`~prefopt_kernels.losses.registry.LOSSES`; a loss registered there (one
    :func:`~prefopt_kernels.losses.registry.register` call) is available here by its name.
    ``loss_type`` is any of :data:`PREFERENCE_LOSS_TYPES`, or a list of DPOTrainer loss types
    (:data:`DPO_LOSS_TYPES`) combined with ``loss_weights``, as TRL's ``loss_type=[...]``;
    ``beta`` and ``loss_kwargs`` go to the loss function (e.g. ``label_smoothing``,
    ``loss_weights``, ``f_divergence_type``, ``gamma``, ``alpha``, ``l1_reward``,
    ``eta``/``tau`` for ``inpo``, whose ``beta`` is unused). ``metrics`` are those of the loss
    plus ``logps/chosen``, ``logps/rejected`` (summed policy log-probs) where the loss does not
    report them. Reference-free losses (``simpo``, ``orpo``, ``cpo*``) take neither reference
    argument (one given is not read).

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
        entry = loss_entry(loss_type)
        if not entry.paired:
            raise ValueError(f"loss_type {loss_type!r} is unpaired; PreferenceLoss takes stacked chosen/rejected pairs")
        check_ignore_index(ignore_index)
        if not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be a bool, got {shift_labels!r}")
        _check_loss_kwargs(entry, loss_type, loss_kwargs)
        self.loss_type = list(loss_type) if isinstance(loss_type, (list, tuple)) else loss_type
        self.entry = entry
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
        entry = self.entry
        if (ref_logits is None) == (ref_logps is None) and entry.needs_reference:
            raise ValueError("give exactly one of ref_logits and ref_logps")
        if entry.needs_kl and ref_logits is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs ref_logits (its KL sums over the vocabulary)")
        if ref_logits is not None and (
            not isinstance(ref_logits, torch.Tensor) or ref_logits.shape != logits.shape
        ):
            raise ValueError(
                f"ref_logits must have the logits' shape {tuple(logits.shape)}, "
                f"got {getattr(ref_logits, 'shape', ref_logits)}"
            )
        owners = (("reward_mask", reward_mask, "chosen_reward_mask"), ("kl_mask", kl_mask, "chosen_kl_mask"),
                  ("prev_logps", prev_logps, "prev_chosen_logps"))
        for name, value, input_name in owners:
            if value is not None and input_name not in entry.inputs:
                raise ValueError(f"{name} is only used by loss_type {_owners(entries_reading(input_name))}, "
                                 f"not {self.loss_type!r}")
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
        if "prev_chosen_logps" in entry.inputs:
            if prev_logps is None:
                raise ValueError(f"loss_type {self.loss_type!r} needs prev_logps ([2B] previous-iterate log-probs)")
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
        n = logits.shape[0] // 2
        if entry.needs_kl:
            # where, not a product: the mask may hold garbage (inf/NaN) at ignored tokens.
            selector = kl_row_selector(kl_mask)
            div_weight = None if selector is None else torch.where(is_valid, selector.float(), 0.0)
            terms = token_terms(logits, labels, ref_logits, divergence="forward_kl", div_weight=div_weight, **common)
            logp, ref_tok = terms.logp, terms.ref_logp
            inputs = stacked_token_inputs(logp - ref_tok, terms.div, valid, reward_mask, kl_mask)
        else:
            logp = token_logprobs(logits, labels, **common)
            if ref_logits is not None and entry.needs_reference:
                with torch.no_grad():
                    ref_tok = token_logprobs(ref_logits, labels, ignore_index=self.ignore_index,
                                             temperature=self.temperature)
            else:
                ref_tok = ref_logps

        seq_logps = sequence_sum(logp, valid)
        metrics_logps = {"logps/chosen": seq_logps[:n].detach().mean(),
                         "logps/rejected": seq_logps[n:].detach().mean()}
        if entry.level == "sequence":
            lengths = valid.sum(dim=1)
            if entry.min_length:
                # A row without a kept label has log-prob 0; its length is taken as min_length.
                lengths = lengths.clamp(min=entry.min_length)
            inputs = {"policy_chosen_logps": seq_logps[:n], "policy_rejected_logps": seq_logps[n:],
                      "chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:]}
            if entry.needs_reference:
                ref_seq = ref_tok if ref_tok.dim() == 1 else sequence_sum(ref_tok.to(torch.float32), valid)
                ref_seq = ref_seq.detach()
                inputs.update(ref_chosen_logps=ref_seq[:n], ref_rejected_logps=ref_seq[n:])
            if prev_logps is not None:
                inputs.update(prev_chosen_logps=prev_logps[:n].detach(), prev_rejected_logps=prev_logps[n:].detach())
        loss, metrics = entry(inputs, beta=self.beta, **self.loss_kwargs)
        for key, value in metrics_logps.items():
            metrics.setdefault(key, value)
        return loss, metrics

