"""Typed schema of conf/fit.yaml's own knobs (Hydra ConfigStore), so a mistyped override fails at composition
with a clear message. ``source``, ``protocol`` and ``law`` are config groups and stay free-form here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class BootstrapConf:
    n: int = 200
    seed: int = 0
    screen: int = 32
    refine: int = 2
    groups: Any = "auto"           # auto | true | false
    min_groups: int = 10


@dataclass
class AllocationConf:
    budgets: List[float] = field(default_factory=lambda: [1e18, 1e20, 1e22, 1e24])


@dataclass
class IsoflopConf:
    enabled: Any = "auto"          # auto | true | false
    min_points: int = 3
    budget_rtol: float = 0.05
    n_bootstrap: int = 200
    window: Optional[float] = None  # each parabola through the points within this factor in N of the best one
    reported_a: Optional[float] = None
    reported_b: Optional[float] = None
    e_profile: int = 12            # Approach 3 refitted at this many values of E (0: no profile)


@dataclass
class FitConf:
    source: Any = None
    protocol: Any = None
    law: Any = None
    logger: Any = None             # conf/logger/: the stage's W&B run (fit/tracking.py)
    results_dir: str = "results"
    sweep: Optional[str] = None
    out: str = "${results_dir}/fit"
    bootstrap: BootstrapConf = field(default_factory=BootstrapConf)
    allocation: AllocationConf = field(default_factory=AllocationConf)
    isoflop: IsoflopConf = field(default_factory=IsoflopConf)
    plots: bool = True


ConfigStore.instance().store(name="fit_schema", node=FitConf)
