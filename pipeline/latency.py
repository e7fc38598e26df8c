"""Inference latency, measured: prefill time for a prompt and per-token decode time with the KV cache.

The protocol is the same for trained models (after each training run) and for randomly initialised shapes
(``scaling-latency``, since latency does not depend on the weights' values): for each batch size, ``warmup``
untimed passes, then ``repeats`` timed ones; we report the median and the spread (min, max, and the interquartile
range relative to the median). On CUDA every timing is bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time

import torch

from models.gpt import GPT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _summary(samples_ms: list[float]) -> dict:
    q = statistics.quantiles(samples_ms, n=4) if len(samples_ms) > 1 else [samples_ms[0]] * 3
    median = statistics.median(samples_ms)
    return {"median": median, "min": min(samples_ms), "max": max(samples_ms),
            "iqr_rel": (q[2] - q[0]) / median if median else 0.0}


@torch.inference_mode()
def measure(model: GPT, prompt_len: int, decode_tokens: int, batch_sizes: list[int], warmup: int = 2,
            repeats: int = 5, dtype: torch.dtype | None = None) -> dict:
    """Measure prefill and per-token decode latency of ``model`` on its own device."""
    cfg = model.config
    if prompt_len + decode_tokens > cfg.seq_len:
        raise ValueError(f"latency.prompt_len + latency.decode_tokens = {prompt_len + decode_tokens} exceeds "
                         f"model.seq_len={cfg.seq_len}")
    if repeats < 1 or warmup < 0 or not batch_sizes:
        raise ValueError("latency needs repeats >= 1, warmup >= 0 and at least one batch size")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype not in (None, torch.float32) else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)
    by_batch = {}
    with autocast:
        for bs in batch_sizes:
            prompt = torch.randint(0, cfg.vocab_size, (bs, prompt_len), generator=gen).to(device)
            step = torch.randint(0, cfg.vocab_size, (bs, 1), generator=gen).to(device)
            prefill, decode = [], []
            for i in range(warmup + repeats):
                cache = model.new_cache(bs, prompt_len + decode_tokens)
                t_prefill = _timed(lambda: model(prompt, cache=cache), device)

                def run_decode():
                    for _ in range(decode_tokens):
                        model(step, cache=cache)

                t_decode = _timed(run_decode, device)
                if i >= warmup:
                    prefill.append(t_prefill * 1e3)
                    decode.append(t_decode * 1e3 / decode_tokens)
            by_batch[bs] = {"prefill_ms": _summary(prefill), "decode_ms_per_token": _summary(decode)}
    model.train(was_training)
    return {
        "device": _device_name(device), "threads": torch.get_num_threads(),
        "dtype": str(dtype or next(model.parameters()).dtype).replace("torch.", ""),
        "prompt_len": prompt_len, "decode_tokens": decode_tokens, "warmup": warmup, "repeats": repeats,
        "batch_sizes": list(batch_sizes), "by_batch": {str(k): v for k, v in by_batch.items()},
        # headline figures: batch 1, and the largest batch measured
        "prefill_ms": by_batch[batch_sizes[0]]["prefill_ms"]["median"],
        "decode_ms_per_token": by_batch[batch_sizes[0]]["decode_ms_per_token"]["median"],
        "batch_large": batch_sizes[-1],
        "decode_ms_per_token_batch": by_batch[batch_sizes[-1]]["decode_ms_per_token"]["median"],
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"
