"""SparsePO token masks: activation-based (from the reference model) and learned.

Both produce one weight per token position ``[B, T]`` of the model's input, in the same
layout as ``input_ids`` (so, like the labels, they are sliced ``[:, 1:]`` when the logits are
shifted). Invalid positions (``valid_mask == 0``) get weight 0.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn


def _first_tensor(output) -> torch.Tensor:
    """A module's output, or the first tensor of a tuple/list output (HF decoder layers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"hooked module returned {type(output).__name__}, not a tensor")


class ActivationTokenMask(nn.Module):
    r"""Activation-based SparsePO mask (MaPO-style), computed from the reference model, detached.

    For each hooked activation ``A ∈ R^{B×T×H}`` (output of a module of one of
    ``module_types``, optionally filtered by name) and each sequence, over its valid tokens:

    1. ``s_t = mean_h A_{t,h}`` (the token's mean activation);
    2. z-normalisation ``z_t = (s_t - mean(s)) / (std(s) + eps)``;
    3. min-max rescaling to [0, 1]: ``m_t = (z_t - min z) / (max z - min z + eps)``;
    4. ``m_t = 0`` at invalid positions;

    and the mask is the average of ``m`` over the hooks. (Step 3 after step 2 gives the same
    ranks and, up to ``eps``, the same values as min-max alone; step 2 keeps the scale of the
    rescaling independent of the activation's magnitude.) A sequence with one valid token gets
    weight 0 there. The result carries no gradient.

    Works with any ``nn.Module`` model, e.g. a HF causal LM: ``module_types`` picks the hooked
    modules (e.g. the decoder-layer class, or ``nn.Linear`` with ``name_filter="mlp.down_proj"``).
    Use ``with masker.record(ref_model): ref_model(...)`` then ``masker.compute(valid_mask)``,
    or ``masker(ref_model, valid_mask, input_ids=..., attention_mask=...)`` for both.
    """

    def __init__(
        self,
        module_types: Union[Type[nn.Module], Sequence[Type[nn.Module]]],
        *,
        name_filter: Optional[str] = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.module_types = tuple(module_types) if isinstance(module_types, (list, tuple)) else (module_types,)
        self.name_filter = name_filter
        self.eps = float(eps)
        self._scores = []

    @contextlib.contextmanager
    def record(self, model: nn.Module):
        """Register forward hooks on the chosen modules of ``model``; removed on exit."""
        handles = []
        self._scores = []
        for name, module in model.named_modules():
            if isinstance(module, self.module_types) and (self.name_filter is None or self.name_filter in name):
                handles.append(module.register_forward_hook(self._hook))
        if not handles:
            raise ValueError(
                f"no module of types {[t.__name__ for t in self.module_types]} "
                f"(name containing {self.name_filter!r}) found in the model"
            )
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, module, inputs, output):
        act = _first_tensor(output)
        if act.dim() != 3:
            raise ValueError(f"hooked activation must be [B, T, H], got shape {tuple(act.shape)}")
        # Only the per-token mean is kept: [B, T] per hook, never the full activation.
        self._scores.append(act.detach().float().mean(dim=-1))

    @torch.no_grad()
    def compute(self, valid_mask: torch.Tensor) -> torch.Tensor:
        """The mask ``[B, T]`` fp32 from the activations recorded by the last forward pass."""
        if not self._scores:
            raise RuntimeError("no activation recorded: run the model inside `record(model)` first")
        valid = valid_mask.to(torch.float32)
        if valid.shape != self._scores[0].shape:
            raise ValueError(
                f"valid_mask has shape {tuple(valid.shape)} but the activations are "
                f"{tuple(self._scores[0].shape)}"
            )
        count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
        live = valid > 0
        total = torch.zeros_like(valid)
        for s in self._scores:
            s = torch.where(live, s, 0.0)  # a padded position's activation (inf, NaN) never enters a sum
            mean = (s * valid).sum(dim=1, keepdim=True) / count
            var = (((s - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
            z = (s - mean) / (var.sqrt() + self.eps)
            big = torch.finfo(z.dtype).max
            lo = torch.where(live, z, big).amin(dim=1, keepdim=True)
            hi = torch.where(live, z, -big).amax(dim=1, keepdim=True)
            total += (z - lo) / (hi - lo + self.eps) * valid
        n_hooks = len(self._scores)
        self._scores = []
        return total / n_hooks

    def forward(self, model: nn.Module, valid_mask: torch.Tensor, **model_inputs) -> torch.Tensor:
        """Run ``model(**model_inputs)`` without gradient under the hooks; return the mask."""
        with torch.no_grad(), self.record(model):
            model(**model_inputs)
        return self.compute(valid_mask)


class LearnedTokenMask(nn.Module):
    r"""Learned SparsePO mask over the reference model's hidden states of every layer.

    .. math::
        m_t = \mathrm{ReLU}\Big(\sum_{l} w_l\, \mathrm{ReLU}\big(a_l^\top \mathrm{LN}(h^{ref}_{l,t}) + b_l\big)\Big)

    ``h^{ref}_{l,t}`` the hidden state of layer ``l`` at position ``t`` (all ``num_layers``
    entries of ``output_hidden_states=True``, embeddings included if given), one LayerNorm
    shared by all layers, dropout on its output. Parameters per network: ``a`` ``[L, H]``,
    ``b`` ``[L]``, ``w`` ``[L]``. The ReLUs make the mask exactly 0 on part of the tokens:
    that is the sparsity. The loss's gradient with respect to the mask is not 0 there (it is the
    token's log-ratio or KL term, :func:`~prefopt_kernels.losses.sparse_po_loss`); the outer ReLU
    passes none of it to the parameters, its gradient being 0 where its input is <= 0.

    Initialisation: ``a`` small, ``b = 1``, ``w = 1/L``, so the mask starts near 1 everywhere
    (SparsePO starts as TDPO1) and the L1 penalty of the loss then sparsifies it.

    ``separate_kl=False``: one network, the same mask for rewards and KL;
    ``separate_kl=True``: two networks (reward, KL) sharing the LayerNorm.
    ``forward(hidden_states, valid_mask=None)`` takes the tuple of ``[B, T, H]`` states (any
    float dtype; detached inside, as they come from the frozen reference) and returns
    ``(reward_mask, kl_mask)``, each fp32 ``[B, T]``, 0 where ``valid_mask`` is 0. Gradients
    reach the mask parameters.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        *,
        separate_kl: bool = False,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        if hidden_size <= 0 or num_layers <= 0:
            raise ValueError(f"hidden_size and num_layers must be > 0, got {hidden_size}, {num_layers}")
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.separate_kl = bool(separate_kl)
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        n_nets = 2 if separate_kl else 1
        self.a = nn.Parameter(torch.randn(n_nets, num_layers, hidden_size) * init_std)
        self.b = nn.Parameter(torch.ones(n_nets, num_layers))
        self.w = nn.Parameter(torch.full((n_nets, num_layers), 1.0 / num_layers))

    def forward(
        self, hidden_states: Sequence[torch.Tensor], valid_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if len(hidden_states) != self.num_layers:
            raise ValueError(
                f"hidden_states holds {len(hidden_states)} layers, the mask was built for {self.num_layers}"
            )
        total = None
        live = None if valid_mask is None else valid_mask[..., None] > 0
        for layer, h in enumerate(hidden_states):
            if h.dim() != 3 or h.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"hidden_states[{layer}] must be [B, T, {self.hidden_size}], got {tuple(h.shape)}"
                )
            h = h.detach().to(self.a.dtype)
            if live is not None:
                # A padded position's hidden state (NaN, inf) never enters the network: its
                # gradient would be 0 * NaN in the backward even where the mask is 0.
                h = torch.where(live, h, 0.0)
            x = self.dropout(self.norm(h))
            # [n_nets, B, T]: one projection per network, accumulated layer by layer so that
            # no [L, B, T, H] stack is ever built.
            proj = torch.einsum("bth,nh->nbt", x, self.a[:, layer]) + self.b[:, layer, None, None]
            term = self.w[:, layer, None, None] * torch.relu(proj)
            total = term if total is None else total + term
        masks = torch.relu(total)
        if valid_mask is not None:
            masks = masks * valid_mask.to(masks.dtype)
        if self.separate_kl:
            return masks[0], masks[1]
        shared = masks[0]
        return shared, shared
