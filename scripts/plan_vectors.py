"""Print the planner's results for the three test vectors of ../shared/reference/sardana2024.md.

    .venv/bin/python scripts/plan_vectors.py

The expected values are in that file and in tests/test_plan.py, which checks them to 4 significant figures.
The two plans are run through scaling-plan's own `run(cfg)`, into a temporary directory.
"""

import contextlib
import io
import tempfile


from scaling_lab.conf import compose
from scaling_lab.fit.plan.cli import load_chinchilla, run

VECTORS = {
    "compute-optimal": ["target.loss=1.947", "demand.tokens=2e12"],
    "cost-optimal": ["objective=cost", "target.loss=1.947", "demand.requests=1e10", "demand.input_tokens=1000",
                     "demand.output_tokens=250", "hardware.train.price_per_hour=1.40",
                     "hardware.inference.price_per_hour=0.60", "hardware.inference.mfu_prefill=0.4",
                     "hardware.inference.mfu_decode=0.2"],
}


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        constants, _ = load_chinchilla(compose("plan", ["constants=sardana2024"]))
        print(f"loss: L(N=70e9, D=1e12) = {float(constants.predict(N=70e9, D=1e12)):.4g}")
        for name, overrides in VECTORS.items():
            cfg = compose("plan", ["constants=sardana2024", f"out={out}/{name}", "plot.points=3",
                                             *overrides])
            with contextlib.redirect_stdout(io.StringIO()):
                doc = run(cfg)
            total = "total_flops" if cfg.objective == "flops" else "total_cost"
            optimal, ratios = doc["optimal"], doc["ratios"]
            print(f"{name}: N={optimal['N']:.4g}, D={optimal['D']:.4g}; {100 * ratios['N']:.2f}% N, "
                  f"{100 * ratios['D']:.2f}% D; {total} {100 * ratios[total]:.2f}% of the Chinchilla-style model's")


if __name__ == "__main__":
    main()
