"""SparsePO with learned token masks on a tiny randomly initialised causal LM, on CPU.

    python examples/train_sparse_po.py [--steps 40] [--device cpu]

Synthetic preference pairs: every response is neutral filler with a few marker tokens;
chosen responses carry "good" markers, rejected ones "bad" markers. The policy starts as a
copy of the (frozen) reference; the loss is SparsePO through ``PreferenceLoss`` (the fused
``pk.token_terms`` path) with a learned reward mask and a learned KL mask over the
reference's hidden states. Prints the loss curve and the mask densities, then the peak memory
of one loss step (forward + backward from the logits) against the eager path
(two log_softmax + gather + KL sum over the vocabulary) at a realistic vocabulary size.

Uses ``transformers`` (a Llama config built in code, nothing downloaded) when importable,
otherwise a small pure-PyTorch causal LM defined below.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from types import SimpleNamespace

import torch
import torch.nn as nn

import prefopt_kernels as pk
from prefopt_kernels.losses import PreferenceLoss, sparse_po_loss
from prefopt_kernels.masks import LearnedTokenMask

VOCAB, HIDDEN, LAYERS = 64, 32, 2
PROMPT_LEN, RESPONSE_LEN = 6, 10
GOOD, BAD, NEUTRAL = range(4, 12), range(12, 20), range(20, VOCAB)
BACKEND = "auto"


class TinyCausalLM(nn.Module):
    """Pre-norm transformer: embeddings, causal self-attention + MLP blocks, LM head.

    ``forward(input_ids, output_hidden_states=False)`` returns ``.logits`` ``[B, T, V]`` and,
    when asked, ``.hidden_states``: the embeddings and every block's output, as HF models do.
    """

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(hidden),
                    "attn": nn.MultiheadAttention(hidden, heads, batch_first=True),
                    "ln2": nn.LayerNorm(hidden),
                    "mlp": nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, output_hidden_states: bool = False):
        t = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=input_ids.device), diagonal=1)
        states = [x]
        for blk in self.blocks:
            h = blk["ln1"](x)
            x = x + blk["attn"](h, h, h, attn_mask=causal, need_weights=False)[0]
            x = x + blk["mlp"](blk["ln2"](x))
            states.append(x)
        return SimpleNamespace(logits=self.head(self.norm(x)), hidden_states=tuple(states) if output_hidden_states else None)


def _backend_name(device: torch.device) -> str:
    chosen = os.environ.get("PREFOPT_BACKEND") or BACKEND
    return f"{chosen} on {device.type} (available: {', '.join(pk.available_backends())})"


def build_model():
    try:
        import transformers
    except ImportError:
        return TinyCausalLM(VOCAB, HIDDEN, LAYERS), "pure-torch TinyCausalLM"
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg), f"transformers LlamaForCausalLM {transformers.__version__}"


def make_batch(n_pairs: int, gen: torch.Generator):
    """Stacked ``[2B, T]`` input ids (chosen rows first) and labels (-100 on the prompt)."""
    neutral = torch.tensor(list(NEUTRAL))

    def responses(markers):
        r = neutral[torch.randint(len(neutral), (n_pairs, RESPONSE_LEN), generator=gen)]
        pos = torch.randint(RESPONSE_LEN, (n_pairs, 3), generator=gen)
        vals = torch.tensor(list(markers))[torch.randint(len(markers), (n_pairs, 3), generator=gen)]
        return r.scatter(1, pos, vals)

    prompt = neutral[torch.randint(len(neutral), (n_pairs, PROMPT_LEN), generator=gen)]
    ids = torch.cat([torch.cat([prompt, responses(GOOD)], 1), torch.cat([prompt, responses(BAD)], 1)])
    labels = ids.clone()
    labels[:, :PROMPT_LEN] = -100
    return ids, labels


def train(steps: int, device: torch.device, n_pairs: int = 8):
    torch.manual_seed(0)
    policy, kind = build_model()
    policy.to(device).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    masks = LearnedTokenMask(HIDDEN, LAYERS + 1, separate_kl=True, dropout=0.0).to(device)
    loss_fn = PreferenceLoss("sparse_po", beta=0.1, shift_labels=True, l1_reward=2e-3, l1_kl=2e-4)
    # The masks get a larger step: their L1 penalty has to move the biases from 1 towards 0.
    opt = torch.optim.AdamW(
        [{"params": policy.parameters(), "lr": 3e-3}, {"params": masks.parameters(), "lr": 3e-2}],
        weight_decay=0.0,
    )
    gen = torch.Generator().manual_seed(1)
    print(f"model: {kind}, {sum(p.numel() for p in policy.parameters())} parameters; "
          f"kernel backend: {_backend_name(device)}")
    print(f"{'step':>4} {'loss':>8} {'margin':>8} {'acc':>5} {'m_u dens':>8} {'m_d dens':>8}")
    curve = []
    for step in range(1, steps + 1):
        ids, labels = (x.to(device) for x in make_batch(n_pairs, gen))
        with torch.no_grad():
            ref_out = reference(input_ids=ids, output_hidden_states=True)
        reward_mask, kl_mask = masks(ref_out.hidden_states, (labels != -100).float())
        logits = policy(input_ids=ids).logits
        loss, metrics = loss_fn(logits, labels, ref_out.logits, reward_mask=reward_mask, kl_mask=kl_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if step == 1 or step % 5 == 0 or step == steps:
            print(f"{step:4d} {loss.item():8.4f} {metrics['rewards/margins'].item():8.4f} "
                  f"{metrics['rewards/accuracies'].item():5.2f} {metrics['mask/density'].item():8.3f} "
                  f"{metrics['mask/kl_density'].item():8.3f}")
    return curve


# --------------------------------------------------------------------------- memory of one loss step


def _eager_sparse_po(logits, labels, ref_logits, reward_mask, kl_mask):
    """The eager path: two [N, V] log_softmax, a gather and a KL sum over the vocabulary."""
    n = logits.shape[0] // 2
    valid = labels != -100
    safe = labels.clamp(min=0)[..., None]
    logp_all = torch.log_softmax(logits.float(), -1)
    with torch.no_grad():
        ref_all = torch.log_softmax(ref_logits.float(), -1)
    logp = logp_all.gather(-1, safe)[..., 0]
    ref_logp = ref_all.gather(-1, safe)[..., 0]
    kl = (ref_all.exp() * (ref_all - logp_all)).sum(-1)
    lr, v = (logp - ref_logp) * valid, valid.float()
    return sparse_po_loss(lr[:n], lr[n:], kl[:n] * v[:n], kl[n:] * v[n:], reward_mask[:n], reward_mask[n:],
                          kl_mask[:n], kl_mask[n:], chosen_mask=v[:n], rejected_mask=v[n:])[0]


def _peak_bytes(fn, device: torch.device) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def memory_comparison(device: torch.device, rows: int = 8, seq: int = 64, vocab: int = 32768):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(rows, seq, vocab, generator=gen).to(device).requires_grad_(True)
    ref_logits = torch.randn(rows, seq, vocab, generator=gen).to(device)
    labels = torch.randint(vocab, (rows, seq), generator=gen).to(device)
    labels[:, : seq // 4] = -100
    reward_mask = torch.rand(rows, seq, generator=gen).to(device)
    kl_mask = torch.relu(torch.rand(rows, seq, generator=gen) - 0.5).to(device)  # half the tokens 0
    fused_fn = PreferenceLoss("sparse_po", beta=0.1)

    def fused():
        loss, _ = fused_fn(logits, labels, ref_logits, reward_mask=reward_mask, kl_mask=kl_mask)
        loss.backward()

    def eager():
        _eager_sparse_po(logits, labels, ref_logits, reward_mask, kl_mask).backward()

    results = {}
    for name, fn in (("fused", fused), ("eager", eager)):
        logits.grad = None
        start = time.perf_counter()
        results[name] = (_peak_bytes(fn, device), time.perf_counter() - start)
    mib = 2.0**20
    print(f"\nloss step (forward + backward from logits [{rows}, {seq}, {vocab}] fp32, "
          f"{logits.numel() * 4 / mib:.0f} MiB each), backend {_backend_name(device)}:")
    for name, (peak, secs) in results.items():
        print(f"  {name:5s} peak {peak / mib:8.1f} MiB above the inputs   {secs:6.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab-for-memory", type=int, default=32768)
    parser.add_argument("--backend", default="auto", help="auto | triton | native | reference")
    args = parser.parse_args()
    device = torch.device(args.device)
    global BACKEND
    BACKEND = args.backend
    pk.use_backend(args.backend)
    start = time.perf_counter()
    curve = train(args.steps, device)
    k = max(1, len(curve) // 5)
    first, last = sum(curve[:k]) / k, sum(curve[-k:]) / k
    print(f"mean loss of the first {k} steps {first:.4f} -> last {k} steps {last:.4f} "
          f"({time.perf_counter() - start:.1f} s)")
    memory_comparison(device, vocab=args.vocab_for_memory)


if __name__ == "__main__":
    main()
