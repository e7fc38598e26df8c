"""Inference-aware model sizing (Sardana, Portes, Doubov, Frankle 2024, arXiv 2401.00448): pure functions.

The loss law ``L(N, D) = E + A/N^alpha + B/D^beta`` is evaluated through ``LawConstants.predict`` (its formula is
written once, in ``conf/law/chinchilla.yaml``); this module holds only the planner's closed forms over the
constants E, A, B, alpha, beta:

* Chinchilla frontier (minimise L subject to 6ND = C): ``fit.laws.chinchilla.frontier_terms``.
* Chinchilla-style model of loss l: ``N = [A(1+alpha/beta)/(l-E)]^(1/alpha)``, ``D = [B(1+beta/alpha)/(l-E)]^(1/beta)``.
* Inference-aware optimum of loss l with lifetime demand D_inf (minimise ``6 N D + 2 N D_inf``): the root in D of
  ``f(D) = B(1+beta/alpha) D^-beta + beta B D_inf/(3 alpha) D^(-beta-1) + E - l``, found by bracketing on
  ``[D_chinchilla(l), upper]``, then ``N = [A/(l - E - B D^-beta)]^(1/alpha)``.

Dollars reduce to the same problem: cost = ``6 N D p_train + 2 N (D_in p_prefill + D_out p_decode)`` with p the
dollars per executed FLOP (price per hour / (3600 peak FLOP/s MFU)), so its optimum is the compute optimum with
``D_inf = (D_in p_prefill + D_out p_decode) / p_train`` (Sardana et al. eq. for C_inf/C_tr).

``lifetime`` is the one price of a model's life (training plus serving the demand); the cost-optimal search over
size, tokens, shape and serving mode with decode priced by a latency law is ``fit/plan/serving.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.optimize import brentq

from scaling_lab.fit.laws.chinchilla import frontier_terms
from scaling_lab.fit.laws.law import LawConstants

CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")
OBJECTIVES = ("flops", "cost")
# The quantities reported for each model; `ratios` in a plan divides the optimal model's by the Chinchilla-style's.
REPORTED = ("N", "D", "train_flops", "inference_flops", "total_flops", "train_cost", "inference_cost",
            "total_cost")


@dataclass(frozen=True)
class Inference:
    """Lifetime inference demand, in tokens, and what speculative decoding does to each output token.

    ``decode_flops_per_token`` and ``decode_time_per_token`` are in units of one plain decode step of the served
    model (2N FLOPs; one step's GPU time); both are 1 without speculative decoding (see ``speculative_factors``).
    """

    prefill_tokens: float
    decode_tokens: float
    decode_flops_per_token: float = 1.0
    decode_time_per_token: float = 1.0

    def __post_init__(self):
        if min(self.prefill_tokens, self.decode_tokens) < 0:
            raise ValueError(f"inference demand must be >= 0 tokens, got prefill {self.prefill_tokens:g}, "
                             f"decode {self.decode_tokens:g}")

    def scaled(self, factor: float) -> "Inference":
        return Inference(self.prefill_tokens * factor, self.decode_tokens * factor, self.decode_flops_per_token,
                         self.decode_time_per_token)

    @property
    def tokens(self) -> float:
        return self.prefill_tokens + self.decode_tokens


@dataclass(frozen=True)
class Prices:
    """Dollars per executed FLOP in training, prefill and decode (see ``dollars_per_flop``)."""

    train: float
    prefill: float
    decode: float


def dollars_per_flop(price_per_hour: float, peak_flops: float, mfu: float) -> float:
    """Cost of one executed FLOP on a GPU rented at ``price_per_hour`` running at ``mfu`` of ``peak_flops``."""
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    if price_per_hour <= 0 or peak_flops <= 0:
        raise ValueError(f"price per hour and peak FLOP/s must be > 0, got {price_per_hour}, {peak_flops}")
    return price_per_hour / (3600.0 * peak_flops * mfu)


def expected_tokens_per_step(acceptance_rate: float, draft_tokens: int) -> float:
    """Tokens one target step yields under speculative decoding (Leviathan et al. 2023, eq. 1):
    ``(1 - alpha^(k+1)) / (1 - alpha)``; k + 1 when every draft token is accepted."""
    if not 0 <= acceptance_rate <= 1 or draft_tokens < 1:
        raise ValueError(f"speculative decoding needs acceptance_rate in [0, 1] and draft_tokens >= 1, got "
                         f"{acceptance_rate}, {draft_tokens}")
    if acceptance_rate == 1:
        return draft_tokens + 1.0
    return (1 - acceptance_rate ** (draft_tokens + 1)) / (1 - acceptance_rate)


def speculative_factors(acceptance_rate: float, draft_tokens: int, draft_cost_ratio: float) -> tuple[float, float]:
    """(FLOPs, time) per output token under speculative decoding, in units of one plain decode step.

    Each target step verifies k + 1 positions after k draft steps that each cost ``c`` of a target step, and
    yields ``expected_tokens_per_step`` tokens. FLOPs: ``(k + 1 + k c) / E[tokens]`` (more than 1: speculation
    spends FLOPs). Time: ``(1 + k c) / E[tokens]``, Leviathan et al.'s assumption that memory-bound decoding
    verifies k + 1 positions in the time of one step; decode dollars scale by this factor.
    """
    if draft_cost_ratio < 0:
        raise ValueError(f"draft_cost_ratio must be >= 0, got {draft_cost_ratio}")
    tokens = expected_tokens_per_step(acceptance_rate, draft_tokens)
    draft = draft_tokens * draft_cost_ratio
    return (draft_tokens + 1 + draft) / tokens, (1 + draft) / tokens


def chinchilla_terms(constants: LawConstants) -> tuple[float, float, float, float, float]:
    """(E, A, B, alpha, beta), or a clear error when ``constants`` lacks one."""
    missing = [p for p in CHINCHILLA_PARAMS if p not in constants.values]
    if missing:
        raise ValueError(f"the planner needs Chinchilla constants {list(CHINCHILLA_PARAMS)}; missing {missing}")
    terms = tuple(constants[p] for p in CHINCHILLA_PARAMS)
    if not all(math.isfinite(t) for t in terms) or min(terms[1:]) <= 0:
        raise ValueError(f"the planner needs finite E and positive A, B, alpha, beta; got {dict(constants.values)}")
    return terms


def _frontier(constants: LawConstants) -> tuple[float, float, float]:
    """(G, a, b) of the Chinchilla frontier ``N = G (C/6)^a``, ``D = (C/6)^b / G`` (checked constants)."""
    chinchilla_terms(constants)
    return tuple(float(x) for x in frontier_terms(constants.values))


def _check_loss(constants: LawConstants, loss: float) -> None:
    if not loss > constants["E"]:
        raise ValueError(f"target loss {loss:g} is not above the irreducible loss E = {constants['E']:g}: "
                         f"no finite model reaches it")


def chinchilla_optimal(constants: LawConstants, compute: float) -> tuple[float, float]:
    """(N, D) minimising the loss for ``compute`` = 6 N D training FLOPs."""
    G, a, b = _frontier(constants)
    return G * (compute / 6) ** a, (compute / 6) ** b / G


def chinchilla_compute(constants: LawConstants, n_params: float) -> float:
    """Training FLOPs whose Chinchilla-optimal model has ``n_params``: ``C = 6 (N/G)^(1/a)``.

    (The reference implementation's tokens version puts the 6 inside the power; correct is ``6 (D G)^(1/b)``.)
    """
    G, a, _ = _frontier(constants)
    return 6 * (n_params / G) ** (1 / a)


@dataclass(frozen=True)
class Frontier:
    """A compute-optimal frontier read from isoFLOP minima (Approach 2: ``N_opt = k_N C^a``, ``D_opt = k_D C^b``),
    as the tokens it gives a model of N parameters, ``D = K N^p`` (``p = b / a``): used for the Chinchilla-style
    model where the fitted law's own frontier is not identified (``fit.fitting.approaches``). The law still gives
    the loss along it."""

    K: float
    p: float
    source: str = "approach2"

    @classmethod
    def from_isoflop(cls, a: float, n_coef: float, b: float, d_coef: float) -> "Frontier":
        if not all(math.isfinite(x) and x > 0 for x in (a, n_coef, b, d_coef)):
            raise ValueError(f"an isoFLOP frontier needs positive a, b and coefficients; got a={a}, N_coef={n_coef}, "
                             f"b={b}, D_coef={d_coef}")
        return cls(K=d_coef * n_coef ** (-b / a), p=b / a)

    def tokens(self, n_params: float) -> float:
        return self.K * n_params ** self.p


def chinchilla_loss(constants: LawConstants, n_params: float, frontier: Frontier | None = None) -> float:
    """Loss of the Chinchilla-optimal model with ``n_params`` parameters (on ``frontier`` when given)."""
    if n_params <= 0:
        raise ValueError(f"parameter count must be > 0, got {n_params:g}")
    if frontier is not None:
        return float(constants.predict(N=n_params, D=frontier.tokens(n_params)))
    n, d = chinchilla_optimal(constants, chinchilla_compute(constants, n_params))
    return float(constants.predict(N=n, D=d))


def chinchilla_style_for_loss(constants: LawConstants, loss: float,
                              frontier: Frontier | None = None) -> tuple[float, float]:
    """(N, D) of the Chinchilla-optimal model that reaches ``loss`` (on ``frontier`` when given: the N whose
    frontier tokens give that loss under the law, found by a bracketed root in log N)."""
    _check_loss(constants, loss)
    E, A, B, alpha, beta = chinchilla_terms(constants)
    n, d = ((A * (1 + alpha / beta) / (loss - E)) ** (1 / alpha),
            (B * (1 + beta / alpha) / (loss - E)) ** (1 / beta))
    if frontier is None:
        return n, d
    excess = lambda x: float(constants.predict(N=math.exp(x), D=frontier.tokens(math.exp(x)))) - loss
    low, high = math.log(n) - 1.0, math.log(n) + 1.0   # excess falls with N along a frontier whose D grows with N
    while excess(low) < 0:
        low -= 2.0
    while excess(high) > 0:
        high += 2.0
    n = math.exp(brentq(excess, low, high, xtol=1e-12, maxiter=500))
    return n, frontier.tokens(n)


def inference_optimal(constants: LawConstants, loss: float, inference_tokens: float) -> tuple[float, float]:
    """(N, D) minimising ``6 N D + 2 N inference_tokens`` subject to ``L(N, D) = loss``."""
    _check_loss(constants, loss)
    if inference_tokens < 0:
        raise ValueError(f"inference demand must be >= 0 tokens, got {inference_tokens:g}")
    E, A, B, alpha, beta = chinchilla_terms(constants)

    def foc(d):  # strictly decreasing in d, >= 0 at the Chinchilla D, -> E - loss < 0 as d -> inf
        return (B * (1 + beta / alpha) * d ** -beta + beta * B * inference_tokens / (3 * alpha) * d ** (-beta - 1)
                + E - loss)

    low = math.log(chinchilla_style_for_loss(constants, loss)[1])  # bracket in log D: relative tolerance in D
    if foc(math.exp(low)) <= 0:  # no demand (up to rounding): the Chinchilla-style model is optimal
        d = math.exp(low)
    else:
        high = low + 1.0
        while foc(math.exp(high)) > 0:
            low, high = high, high + 1.0
        d = math.exp(brentq(lambda x: foc(math.exp(x)), low, high, xtol=1e-14, maxiter=500))
    return (A / (loss - E - B * d ** -beta)) ** (1 / alpha), d


def equivalent_inference_tokens(objective: str, inference: Inference, prices: Prices) -> float:
    """The D_inf of the compute problem whose optimum is ``objective``'s optimum (per-parameter cost / 2)."""
    if objective == "flops":
        return inference_flops(1.0, inference) / 2
    if objective == "cost":
        return inference_dollars(1.0, inference, prices) / (2 * prices.train)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def inference_flops(n_params: float, inference: Inference) -> float:
    """FLOPs of serving ``inference`` with a model of ``n_params``: 2N a token, speculation included."""
    return 2 * n_params * (inference.prefill_tokens + inference.decode_tokens * inference.decode_flops_per_token)


def inference_dollars(n_params: float, inference: Inference, prices: Prices,
                      decode_dollars_per_token: float | None = None) -> float:
    """Dollars of serving ``inference``: prefill at 2N FLOPs a token; decode likewise at the decode MFU, unless
    ``decode_dollars_per_token`` (a plain decode step's price from a latency model) is given."""
    decode = 2 * n_params * prices.decode if decode_dollars_per_token is None else decode_dollars_per_token
    return (2 * n_params * inference.prefill_tokens * prices.prefill
            + inference.decode_tokens * inference.decode_time_per_token * decode)


def lifetime(n_params: float, train_tokens: float, inference: Inference, prices: Prices,
             decode_dollars_per_token: float | None = None) -> dict:
    """FLOPs and dollars of training a model of ``n_params`` on ``train_tokens`` and serving ``inference``."""
    train_flops = 6 * n_params * train_tokens
    serve_flops = inference_flops(n_params, inference)
    train_cost = train_flops * prices.train
    serve_cost = inference_dollars(n_params, inference, prices, decode_dollars_per_token)
    return {"N": n_params, "D": train_tokens, "tokens_per_param": train_tokens / n_params,
            "train_flops": train_flops, "inference_flops": serve_flops, "total_flops": train_flops + serve_flops,
            "train_cost": train_cost, "inference_cost": serve_cost, "total_cost": train_cost + serve_cost}


def compare(result: dict, total: str, keys: tuple[str, ...] = REPORTED) -> dict:
    """Add optimal/chinchilla ``ratios`` and the ``saving`` in ``total`` to a {chinchilla, optimal} result."""
    result["ratios"] = {k: (result["optimal"][k] / result["chinchilla"][k] if result["chinchilla"][k] else None)
                        for k in keys}
    result["saving"] = 1 - result["ratios"][total]
    return result


def plan(constants: LawConstants, loss: float, inference: Inference, prices: Prices, objective: str,
         frontier: Frontier | None = None) -> dict:
    """The Chinchilla-style (on ``frontier`` when given) and the ``objective``-optimal model of ``loss``, with the
    optimal/Chinchilla ratios."""
    d_inf = equivalent_inference_tokens(objective, inference, prices)
    models = {"chinchilla": chinchilla_style_for_loss(constants, loss, frontier),
              "optimal": inference_optimal(constants, loss, d_inf)}
    result = {name: {**lifetime(n, d, inference, prices), "loss": float(constants.predict(N=n, D=d))}
              for name, (n, d) in models.items()}
    result["equivalent_inference_tokens"] = d_inf
    return compare(result, "total_flops" if objective == "flops" else "total_cost")

