"""scaling-lab from Python: the same code paths as the commands, for notebooks.

    import scaling_lab
    runs = scaling_lab.load_sweep("results", "demo")                  # a sweep's records as a DataFrame
    result = scaling_lab.fit_laws(runs, N="params_non_embedding", D="tokens_budget", loss="loss",
                                  budget="flops_budget")            # scaling-fit on it: fit.json, intervals, frontier
    result.predict("chinchilla", N=1e6, D=2e7)
    result.frontier([1e18, 1e20])                                    # N_opt, D_opt per compute budget
    plan = scaling_lab.plan(result.path, target_loss=2.5, demand_tokens=1e12)   # scaling-plan

``fit_laws`` writes its DataFrame to a CSV and runs ``scaling-fit source=csv`` on it (every setting of
``conf/fit.yaml`` is an override: ``overrides=["bootstrap.n=50", ...]``); ``plan`` runs ``scaling-plan``. Each
returns what the command writes, read back. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FitResult", "fit_laws", "load_fit", "load_sweep", "plan"]


def __getattr__(name: str) -> Any:
    """``scaling_lab.fit_laws`` and the rest, from ``scaling_lab.notebook`` on first use (PEP 562): the commands
    import this package too, and must not pay for pandas before their ``--help``."""
    if name in __all__:
        from scaling_lab import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'scaling_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The API's names too, for a notebook's completion."""
    return sorted({*globals(), *__all__})
