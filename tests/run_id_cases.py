"""The configurations whose run ids are pinned in ``tests/golden/run_ids.json`` (``tests/test_run_identity.py``).

Regenerate the table only on purpose, and say in the commit why the ids moved (CHANGELOG.md tells users what to do
with their old results): ``python -m tests.run_id_cases --write``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden" / "run_ids.json"

# Single runs beside the sweep presets' grids: a cosine run at the defaults, budgets in FLOPs (both conventions), the
# budget-dependent batch and the width-dependent LR, a WSD branch, each corpus source, the GPU preset.
SINGLE = {
    "cosine default": [],
    "cosine seed 1, 2 layers x 64": ["model.n_layers=2", "model.d_model=64", "train.seed=1"],
    "flops, model convention": ["train.tokens=null", "train.flops=1e13"],
    "flops, 6N convention": ["train.tokens=null", "train.flops=1e13", "train.flops_convention=6N"],
    "sqrt batch, inverse-width lr": ["train.batch_rule=sqrt_tokens", "train.lr_rule=inverse_width"],
    "wsd branch": ["train.schedule=wsd", "train.warmup_steps=10", "train.tokens=1e6"],
    "wsd branch, other decay": ["train.schedule=wsd", "train.warmup_steps=10", "train.tokens=1e6",
                                "train.decay_frac=0.1"],
    "data=files": ["data=files", "data.path=/data/books", "data.val_path=/data/books-val"],
    "data=hub": ["data=hub", "data.name=HuggingFaceFW/fineweb-edu", "data.subset=sample-10BT", "train.tokens=5e8"],
    "train=gpu": ["train=gpu"],
}

# The Makefile's demo launches beside the preset's own grid (held-out class, smallest shape, second seed).
DEMO_EXTRA = [["model.params=2.4e5", "model.n_layers=3,4,6,8"], ["model.params=2.5e4", "model.n_layers=2"],
              ["model.params=2.4e5", "model.n_layers=4", "train.seed=1"]]
SWEEPS = ("demo", "smoke", "isoflop", "lr_scan", "paper_small")


def cases() -> list[tuple[str, list[str]]]:
    """(name, overrides) of every pinned configuration."""
    from scaling_lab.conf import compose
    from scaling_lab.pipeline.sweep import grid

    found = list(SINGLE.items())
    for sweep in SWEEPS:
        params = compose("train", [f"sweep={sweep}"], return_hydra_config=True).hydra.sweeper.params
        launches = [[]] + (DEMO_EXTRA if sweep == "demo" else [])
        for extra in launches:
            for point in grid(params, [f"sweep={sweep}", *extra]):
                found.append((f"sweep={sweep}", point))
    return found


def ids(overrides: list[str]) -> dict:
    """The run id (and a WSD branch's trunk id) that ``overrides`` plan to."""
    from scaling_lab.conf import compose
    from scaling_lab.pipeline.runspec import plan_run

    spec = plan_run(compose("train", overrides))
    return {"run_id": spec.run_id, "trunk_id": spec.trunk_id}


def table() -> list[dict]:
    return [{"case": name, "overrides": overrides, **ids(overrides)} for name, overrides in cases()]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.run_id_cases --write  (regenerates tests/golden/run_ids.json)")
    rows = table()
    lines = ",\n".join(f"  {json.dumps(row)}" for row in rows)  # one case a line: a moved id is a one-line diff
    GOLDEN.write_text(f'{{"cases": [\n{lines}\n]}}\n')
    print(f"{len(rows)} cases written to {GOLDEN}")
