"""Speculative sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).

One step: the draft proposes k tokens autoregressively (with its KV cache); the target scores all of them in one
forward pass over ``[last, x1..xk]`` with its KV cache (k + 1 distributions); ``x_i`` is accepted with probability
``min(1, p(x_i) / q(x_i))``; at the first rejection a token is drawn from ``norm(max(0, p - q))`` and the step ends;
if all k are accepted a bonus token is drawn from the (k+1)-th distribution. Both caches are rolled back to the
accepted length. The output is distributed exactly as the target's own sampling with the same warping
(temperature and top-k applied identically to p and q); temperature 0 is greedy (p and q one-hot at their argmax),
where the output equals the target's greedy decoding.

``verify`` is the acceptance rule alone, vectorized over a batch of independent (p, q, draft) triples, so its
output distribution can be tested on many samples; ``speculative_generate`` drives two models with it (batch 1).
The models run on their own device (the tokens they are fed are created there); their logits come back to the CPU,
where warping, the acceptance rule and sampling run with a CPU ``torch.Generator`` (a seed draws the same on every
device; each step reads its tokens back to Python anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def warp(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Probabilities after temperature and top-k (last dimension); temperature 0: one-hot at the argmax."""
    logits = logits.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).double()
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(int(top_k), logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator).reshape(probs.shape[:-1])


def verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, generator: torch.Generator | None = None,
           accept_all: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule on a batch: ``p`` (B, k+1, V) target, ``q`` (B, k, V) draft distributions, ``drafted``
    (B, k) the draft's tokens. Returns (accepted count (B,), the next token (B,)): the residual sample at the first
    rejection, else the bonus token from ``p[:, k]``. ``accept_all`` (a negative control for tests) skips the rule."""
    B, k = drafted.shape
    p_x = p[:, :k].gather(-1, drafted[..., None])[..., 0]
    q_x = q.gather(-1, drafted[..., None])[..., 0]
    u = torch.rand(B, k, generator=generator, dtype=torch.float64, device=p.device)
    ok = torch.ones(B, k, dtype=torch.bool, device=p.device) if accept_all else u * q_x < p_x  # u < p/q, no 0 division
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # accepted tokens before the first rejection
    rows = torch.arange(B, device=p.device)
    stop = accepted.clamp(max=k - 1)
    residual = (p[rows, stop] - q[rows, stop]).clamp(min=0)
    norm = residual.sum(-1, keepdim=True)
    # p == q at the rejected position cannot reject; guard the 0/0 anyway with p itself
    residual = torch.where(norm > 0, residual / norm.clamp(min=1e-300), p[rows, stop])
    resampled = sample(residual, generator)
    bonus = sample(p[:, k], generator)
    return accepted, torch.where(accepted == k, bonus, resampled)


@dataclass
class SpeculativeStats:
    target_steps: int = 0        # target forward passes after the prefill (one per speculative step)
    drafted: int = 0             # draft tokens proposed
    accepted: int = 0            # draft tokens accepted
    emitted: int = 0             # tokens produced
    accepted_per_step: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_step(self) -> float:
        return self.emitted / self.target_steps if self.target_steps else 0.0


@torch.inference_mode()
def speculative_generate(target, draft, prompt: torch.Tensor, new_tokens: int, k: int, temperature: float = 0.0,
                         top_k: int | None = None, generator: torch.Generator | None = None,
                         accept_all: bool = False) -> tuple[torch.Tensor, SpeculativeStats]:
    """``new_tokens`` tokens after ``prompt`` (1, T >= 2) from ``target``, proposed ``k`` at a time by ``draft``.

    Invariant between steps: both caches hold every token but the last one emitted (``pending`` holds the tokens a
    model has not seen yet), so each step feeds a model exactly what it is missing."""
    if prompt.size(0) != 1 or prompt.size(1) < 2:
        raise ValueError("speculative_generate decodes one sequence with a prompt of at least 2 tokens")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocabulary {draft.config.vocab_size} differs from the target's "
                         f"{target.config.vocab_size}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    max_len = prompt.size(1) + new_tokens + k + 1
    if max_len > min(target.config.seq_len, draft.config.seq_len):
        raise ValueError(f"prompt + new tokens + k = {max_len} exceeds the models' seq_len")
    tokens = prompt[0].tolist()
    t_dev, d_dev = _device(target), _device(draft)
    t_cache, d_cache = target.new_cache(1, max_len), draft.new_cache(1, max_len)
    target(prompt[:, :-1].to(t_dev), cache=t_cache)
    draft(prompt[:, :-1].to(d_dev), cache=d_cache)
    stats = SpeculativeStats()
    goal = len(tokens) + new_tokens
    while len(tokens) < goal:
        # the draft proposes k tokens, feeding first what it has not seen
        proposal, qs = [], []
        feed = tokens[d_cache.length:]
        for i in range(k):
            logits = draft(torch.tensor([feed], device=d_dev), cache=d_cache)[:, -1].cpu()
            q = warp(logits, temperature, top_k)
            x = int(sample(q, generator)) if temperature else int(q.argmax(-1))
            proposal.append(x)
            qs.append(q)
            feed = [x]
        # the target scores [unseen..., x1..xk] in one pass: the last k+1 positions give p_1..p_{k+1}
        t_feed = tokens[t_cache.length:] + proposal
        p = warp(target(torch.tensor([t_feed], device=t_dev), cache=t_cache)[:, -(k + 1):].cpu(), temperature, top_k)
        accepted, nxt = verify(p, torch.stack(qs, dim=1), torch.tensor([proposal]), generator, accept_all)
        j = int(accepted[0])
        new = proposal[:j] + [int(nxt[0])]
        tokens += new
        stats.target_steps += 1
        stats.drafted += k
        stats.accepted += j
        stats.emitted += len(new)
        stats.accepted_per_step.append(j)
        # roll back: keep every token but the last one emitted
        t_cache.rollback(min(t_cache.length, len(tokens) - 1))
        d_cache.rollback(min(d_cache.length, len(tokens) - 1))
    out = torch.tensor([tokens[:goal]])
    stats.emitted -= len(tokens) - goal
    return out, stats


@torch.inference_mode()
def target_generate(target, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Target-only decoding with the same warping and cache layout (the baseline speculative decoding is timed
    and checked against)."""
    device = _device(target)
    cache = target.new_cache(1, prompt.size(1) + new_tokens)
    logits = target(prompt.to(device), cache=cache)[:, -1].cpu()
    tokens = prompt[0].tolist()
    for i in range(new_tokens):
        p = warp(logits, temperature, top_k)
        x = int(sample(p, generator)) if temperature else int(p.argmax(-1))
        tokens.append(x)
        if i + 1 < new_tokens:
            logits = target(torch.tensor([[x]], device=device), cache=cache)[:, -1].cpu()
    return torch.tensor([tokens])


def _device(model) -> torch.device:
    return next(model.parameters()).device
