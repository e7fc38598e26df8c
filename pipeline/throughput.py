"""Training speed as GPU users read it: the device, its peak FLOP/s, steady-state tokens/s and model-FLOPs
utilisation (the model's training FLOPs per second, ``GPTConfig.flops_per_token``, over the peak of its devices)."""

from __future__ import annotations

import functools
import statistics
import time

import torch

from scaling_lab.pipeline.module import StepEnd

# the precision setting -> the dtype its matmuls run in (what a device's peak is quoted for)
MATMUL_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
                "16-mixed": torch.float16, "16-true": torch.float16}


@functools.lru_cache(maxsize=None)
def matmul_peak(threads: int, n: int = 1024, reps: int = 20, rounds: int = 5) -> float:
    """FLOP/s of an n x n fp32 matmul on this CPU at ``threads`` threads (the best of ``rounds`` timed batches)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n ** 3 / best


def device_peak(device: torch.device, precision: str, threads: int) -> tuple[str, float | None, str]:
    """(the device's name, its peak FLOP/s for this precision, where that figure comes from). A GPU's from
    Lightning's table of datasheet peaks; a CPU's measured here, now, by a short fp32 matmul (no table knows it)."""
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        name = torch.cuda.get_device_name(device)
        peak = get_available_flops(device, MATMUL_DTYPE.get(str(precision), torch.float32))
        return name, float(peak) if peak else None, "datasheet (lightning get_available_flops)"
    return "cpu", matmul_peak(threads, n=1024, reps=5, rounds=3), f"fp32 1024^3 matmul measured, {threads} thread(s)"


class StepTimes(StepEnd):
    """The end of every training step, read without synchronising the device: steady-state speed is the median
    gap between consecutive ends after the first tenth of the steps (warm-up, compilation), so the steps that ran a
    validation or saved a checkpoint do not count."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stepped(trainer):
            self.ends.append(time.perf_counter())

    def tokens_per_s(self, tokens_per_step: int) -> float | None:
        ends = self.ends[max(1, len(self.ends) // 10):]
        gaps = [b - a for a, b in zip(ends, ends[1:])]
        return tokens_per_step / statistics.median(gaps) if len(gaps) >= 3 else None
