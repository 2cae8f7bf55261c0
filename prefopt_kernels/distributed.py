r"""Vocabulary-sharded ops: the collectives that turn per-shard row states into global results.

With ``process_group=`` given, every rank holds a contiguous shard ``[v0_r, v0_r + V_r)`` of
the vocabulary, shards in rank order, of any size (0 included). A pass folds the local shard
into a :class:`~prefopt_kernels.backends.row_state.RowState`, the states are all-gathered and
merged in rank order (the same arithmetic on every rank, so every rank holds bit-identical
global results), a second sweep's partial sums are all-reduced, and each rank's backward
writes its own shard's gradient from the global statistics, with no communication at all
(the fused linear ops then all-reduce the replicated hidden states' gradient).

Before any of that, one all-gather checks that the ranks agree on the call (the spec's
fingerprint and the call's facts). What each collective moves per token:
:func:`exchange_bytes_per_token`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .backends import RowStats, row_state
from .spec import HeadSpec, LinearSpec, OpSpec, float_bits, op_of

# argmax travels with the fp32 state: exact for every index below 2**24.
MAX_SHARDED_VOCAB = 2**24


class Shard(NamedTuple):
    """This rank's vocabulary shard ``[v0, v0 + local)`` of ``vocab`` entries; ``group`` None: unsharded."""

    group: object
    v0: int
    vocab: int


def shard_for_call(process_group, spec, has_ref: bool, local_vocab: int, rows: int, device,
                   labels: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   hidden_sizes: Sequence[int] = (), **naming) -> Shard:
    """The :class:`Shard` of a call of ``spec`` (an ``OpSpec`` or a ``LinearSpec``; ``hidden_sizes``
    are the latter's heads' H; ``naming``: :func:`agree_on_call`'s ``names`` and ``extra``).

    No communication without a group; with one, the call check first (:func:`agree_on_call`).
    """
    if process_group is None:
        return Shard(None, 0, local_vocab)
    check_group(process_group, device)
    v0, vocab = agree_on_call(spec, has_ref, local_vocab, rows, process_group, device, labels, weight,
                              hidden_sizes, **naming)
    return Shard(process_group, v0, vocab)


def group_name(process_group, device: torch.device) -> str:
    """The name a registered op carries for ``process_group`` (``""`` for none), once it is checked."""
    if process_group is None:
        return ""
    check_group(process_group, device)
    return process_group.group_name


def shard_to_tensor(shard: Shard) -> torch.Tensor:
    """``[v0, vocab]`` int64 on the CPU: how a forward hands its shard to its backward."""
    return torch.tensor([shard.v0, shard.vocab], dtype=torch.int64)


def shard_from_tensor(name: str, offsets: Optional[torch.Tensor], local_vocab: int) -> Shard:
    """The inverse of :func:`shard_to_tensor` for the group named ``name``; no communication."""
    if not name:
        return Shard(None, 0, local_vocab)
    v0, vocab = (int(x) for x in offsets.tolist())
    return Shard(group_named(name), v0, vocab)


def group_named(name: str):
    """The process group :func:`group_name` named (``None`` for ``""``)."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def finish_first_pass(backend, state: row_state.RowState, labels, weight, spec: OpSpec, group,
                      every_row_read: bool = False) -> RowStats:
    """The forward's statistics from this rank's state: merged over the group first, if any, then
    finished by ``backend.finalize`` in one launch (``every_row_read``: as
    :func:`~prefopt_kernels.backends.row_state.finalize`)."""
    if group is not None:
        state, _ = merge_across(state, spec, group)
    return backend.finalize(state, labels, weight, spec, every_row_read)


def finish_second_pass(backend, stats: RowStats, value_sum, centred_sum, labels, weight, spec: OpSpec, group,
                       every_row_read: bool = False) -> RowStats:
    """A second-sweep divergence from this rank's partial sums: summed over the group first, if any,
    then finished by ``backend.finish_sweep`` in one launch (``every_row_read``: as
    :func:`~prefopt_kernels.backends.row_state.finish_sweep`)."""
    value_sum, centred_sum = value_sum.to(torch.float32), centred_sum.to(torch.float32)
    if group is not None:
        all_reduce_sum(value_sum, centred_sum, process_group=group)
    return backend.finish_sweep(stats, value_sum, centred_sum, labels, weight, spec, every_row_read)


def sharded_stats(backend, rows, labels, ref_rows, weight, spec: OpSpec, shard: Shard,
                  candidates: int = 0) -> Tuple[RowStats, Optional[torch.Tensor]]:
    """The forward of a logits op over a vocabulary shard ``rows`` ``[B, T, V_r]``: ``(stats, largest)``.

    ``stats`` are the global statistics. With ``candidates > 0`` the backend's fold also gathers,
    in its one read of the shard (``fold_with_candidates``), each row's ``candidates`` largest raw
    policy logits of this shard: ``largest`` fp32 ``[N, candidates]``, descending, ``-inf`` padded
    (all ``-inf`` for an empty shard and on skipped rows), not yet merged across the ranks
    (:meth:`~prefopt_kernels.sampling.Candidates.merge_across` does that); ``None`` otherwise.
    """
    n = rows.shape[0] * rows.shape[1]
    state = row_state.empty(n, spec, ref_rows is not None, rows.device)
    largest = None
    if candidates:
        state, largest = backend.fold_with_candidates(state, rows, labels, ref_rows, weight, spec, shard.v0,
                                                      candidates)
    elif rows.shape[2]:
        state = backend.fold(state, rows, labels, ref_rows, weight, spec, shard.v0)
    stats = finish_first_pass(backend, state, labels, weight, spec, shard.group)
    if not (spec.member and spec.member.second_sweep):
        return stats, largest
    if rows.shape[2]:
        value_sum, centred_sum = backend.sweep(stats, rows, ref_rows, labels, weight, spec, shard.v0,
                                               torch.empty(n, dtype=torch.float32, device=rows.device),
                                               torch.empty(n, dtype=torch.float32, device=rows.device),
                                               first_slice=True)
    else:
        value_sum = torch.zeros(n, dtype=torch.float32, device=rows.device)
        centred_sum = torch.zeros(n, dtype=torch.float32, device=rows.device)
    return finish_second_pass(backend, stats, value_sum, centred_sum, labels, weight, spec, shard.group), largest


def _dist():
    import torch.distributed as dist

    return dist


def check_group(process_group, device: torch.device) -> None:
    """Raise a clear error unless ``process_group`` is usable with tensors on ``device``."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group needs torch.distributed initialised (init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None; got {process_group!r:.80}")
    backend = str(dist.get_backend(process_group)).lower()
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"process_group uses nccl, which cannot communicate {device.type} tensors; use gloo")


def _call_facts(spec, has_ref: bool, local_vocab: int, rows: int, labels, weight, hidden_sizes,
                names: Tuple[str, str] = ("labels", "weight")) -> list:
    """What every rank must agree on beyond the spec, as ``(name, int64)`` pairs: the local V
    first (the one entry that may differ), the rows, the heads' hidden sizes (what the linear
    backward's all-reduce depends on), checksums of labels and weights (named by ``names``), and
    the kept labels' range last."""
    ignore_index = op_of(spec).ignore_index
    label_sum = label_moment = weight_nonzero = weight_sum = 0
    label_min, label_max = 0, -1
    if labels is not None and labels.numel():
        positions = torch.arange(1, labels.numel() + 1, device=labels.device)
        label_sum, label_moment = int(labels.sum()), int((labels * positions).sum())
        kept = labels[labels != ignore_index]
        if kept.numel():
            label_min, label_max = int(kept.min()), int(kept.max())
    if weight is not None and weight.numel():
        weight_nonzero, weight_sum = int((weight != 0).sum()), float_bits(float(weight.double().sum()))
    sizes = list(hidden_sizes) + [-1] * (2 - len(hidden_sizes))
    label_name, weight_name = names
    return [("local vocabulary", local_vocab), ("rows", rows), ("reference", int(has_ref)),
            ("linear op", int(isinstance(spec, LinearSpec))), ("heads[0].hidden_size", sizes[0]),
            ("heads[1].hidden_size", sizes[1]), (label_name, label_sum), (label_name, label_moment),
            (weight_name, weight_nonzero), (weight_name, weight_sum), (weight_name, int(weight is not None)),
            (label_name, label_min), (label_name, label_max)]


def _widest_spec() -> LinearSpec:
    """The spec with the longest fingerprint: a fused linear call with two heads, both soft-capped."""
    head = HeadSpec(softcap=1.0)
    return LinearSpec(OpSpec(), (head, head))


# int64 values each rank contributes to a call's check: every call sends this many, its
# spec's fingerprint padded, so ranks on different ops still exchange tables of one size.
CALL_CHECK_INT64 = len(_call_facts(OpSpec(), False, 1, 0, None, None, ())) + len(_widest_spec().fingerprint())
_PADDING = ("spec", -1)


def agree_on_call(spec, has_ref: bool, local_vocab: int, rows: int, process_group, device,
                  labels: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  hidden_sizes: Sequence[int] = (), names: Tuple[str, str] = ("labels", "weight"),
                  extra: Sequence[Tuple[str, int]] = ()):
    """``(v0, vocab)``: this rank's shard offset and the global vocabulary, after checking the ranks agree.

    Every rank contributes its local V, the call's facts (rows, reference, hidden sizes, checksums of
    ``labels`` and ``weight``, the range of the kept labels) and ``spec``'s
    :func:`~prefopt_kernels.spec.fingerprint`; every rank then sees the same table, so a
    disagreement, or a label outside the global vocabulary, raises the same ``ValueError`` on
    every rank instead of hanging in a later collective or returning different numbers per rank.

    An op whose arguments are not the labels and weights of the token ops names what it passes
    there by ``names`` (in the errors too), and adds its own ``(name, int64)`` facts as ``extra``:
    they take the place of the padding, so the table keeps its one size.
    """
    dist = _dist()
    facts = _call_facts(spec, has_ref, local_vocab, rows, labels, weight, hidden_sizes, names)
    label_name = names[0]
    checked = spec.fingerprint() + list(extra)
    if len(facts) + len(checked) > CALL_CHECK_INT64:
        raise ValueError(f"a call check holds at most {CALL_CHECK_INT64} facts; this call has "
                         f"{len(facts) + len(checked)}")
    checked += [_PADDING] * (CALL_CHECK_INT64 - len(facts) - len(checked))
    # The labels' range stays last: it is read from the table below.
    fields, mine = zip(*(facts[:-2] + checked + facts[-2:]))
    table = all_gather(torch.tensor(mine, dtype=torch.int64, device=device), process_group).cpu()
    rank = dist.get_rank(process_group)
    differing = {fields[j] for j in range(1, table.shape[1]) if bool((table[:, j] != table[0, j]).any())}
    if differing:
        raise ValueError(
            "every rank of process_group must call the same op with the same tokens, labels, weights "
            f"and parameters; the ranks differ in: {', '.join(sorted(differing))}"
        )
    sizes = table[:, 0]
    vocab = int(sizes.sum())
    if vocab < 1:
        raise ValueError("the vocabulary shards of process_group hold no entry at all")
    if vocab > MAX_SHARDED_VOCAB:
        raise ValueError(f"a sharded vocabulary must have at most {MAX_SHARDED_VOCAB} entries; got {vocab}")
    label_min, label_max = int(table[0, -2]), int(table[0, -1])
    if label_max >= 0 and (label_min < 0 or label_max >= vocab):
        bad = label_min if label_min < 0 else label_max
        raise ValueError(
            f"{label_name} must lie in [0, {vocab}) (the sharded vocabulary) or equal "
            f"{op_of(spec).ignore_index} (ignored); found {bad}"
        )
    return int(sizes[:rank].sum()), vocab


def merge_across(state: row_state.RowState, spec: OpSpec, process_group, extra=()) -> tuple:
    """The global state of every row: each rank's state all-gathered and merged in rank order.

    ``extra`` are further fp32 ``[N]`` tensors gathered alongside (one collective in all);
    returns ``(state, gathered_extra)`` with ``gathered_extra[i]`` of shape ``[R, N]``.
    """
    names = [f.name for f in dataclasses.fields(state) if getattr(state, f.name) is not None]
    rows = state.max.shape[0]
    packed = torch.stack([getattr(state, name).to(torch.float32) for name in names] + list(extra))
    gathered = all_gather(packed, process_group)
    world = gathered.shape[0]
    merged: Optional[row_state.RowState] = None
    for r in range(world):
        fields = {name: gathered[r, i] for i, name in enumerate(names)}
        fields["argmax"] = fields["argmax"].to(torch.int64)
        piece = row_state.RowState(**fields)
        merged = piece if merged is None else row_state.merge(merged, piece, spec)
    tail = [gathered[:, len(names) + i].reshape(world, rows) for i in range(len(extra))]
    return merged, tail


def all_gather(tensor: torch.Tensor, process_group) -> torch.Tensor:
    """``[R, *tensor.shape]``: every rank's ``tensor``, in rank order."""
    dist = _dist()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, tensor.contiguous(), group=process_group)
    return torch.stack(parts)


def all_reduce_sum(*tensors: torch.Tensor, process_group) -> None:
    """Sum each tensor over the ranks, in place (one collective for all of them)."""
    dist = _dist()
    if len(tensors) == 1 and tensors[0].dtype == torch.float32 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0], group=process_group)
        return
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    dist.all_reduce(flat, group=process_group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()


# The fp32 values per token that the fused linear ops' extras add to the state's all-gather.
_EXTRA_FLOATS = {"mean_logits": 1, "is_top1": 0, "log_sum_sq_probs": 2}


def exchange_bytes_per_token(spec: OpSpec, has_ref: bool, ranks: int, tokens: int, *,
                             hidden_size: Optional[int] = None, extras: Sequence[str] = ()) -> float:
    """Bytes per token that the collectives of one sharded call move, forward and backward.

    The one statement of the formula. A collective is counted by what each rank receives: an
    all-gather by its gathered result (``R`` times its input), an all-reduce by its tensor. With
    ``R = ranks`` and ``N = tokens``:

    * forward, the all-gather of every rank's row state: ``4 R F`` bytes, ``F`` the fp32 fields
      of the state ``spec`` needs (:func:`~prefopt_kernels.backends.row_state.empty`: 4 for
      log-probs, one more with the entropy, 8 for a divergence or the terms, 9 for reverse KL),
      plus, for the fused linear ops, 1 for the ``mean_logits`` extra and 2 for
      ``log_sum_sq_probs``;
    * a second-sweep divergence (``Divergence.second_sweep``: js, tv, hellinger, chi2, alpha):
      one all-reduce of its 2 fp32 partial sums, 8 bytes;
    * backward: nothing for the logits ops; the fused linear ops all-reduce the fp32 gradient of
      the replicated hidden states, ``4 H`` bytes, when ``hidden`` needs one (pass its width as
      ``hidden_size``; None otherwise);
    * the call check, before all of that: one all-gather of :data:`CALL_CHECK_INT64` int64 per
      rank, ``8 R CALL_CHECK_INT64`` bytes per call, spread here over the ``N`` tokens.

    ``tokens`` are the rows whose states are exchanged (the fused linear ops drop ignored tokens
    before any of this).
    """
    unknown = set(extras) - set(_EXTRA_FLOATS)
    if unknown:
        raise ValueError(f"extras must be among {sorted(_EXTRA_FLOATS)}; got {sorted(unknown)}")
    if ranks < 1 or tokens < 1:
        raise ValueError(f"ranks and tokens must be positive; got ranks={ranks}, tokens={tokens}")
    state_floats = len(row_state.empty(1, spec, has_ref, "cpu").tensors())
    state_floats += sum(_EXTRA_FLOATS[name] for name in extras)
    per_token = 4 * ranks * state_floats
    if spec.member is not None and spec.member.second_sweep:
        per_token += 4 * 2
    if hidden_size is not None:
        per_token += 4 * hidden_size
    return per_token + 8 * ranks * CALL_CHECK_INT64 / tokens
