"""Benchmark: the Lightning training loop against a plain PyTorch loop, on the same model, data and optimizer.

    python scripts/bench_train_loop.py [train-config overrides ...]   (or: make bench)

Both loops train the same freshly initialised model on the same batches with the same AdamW, warmup-cosine
schedule and gradient clipping, for the same number of steps; they alternate (plain, Lightning, plain, Lightning...)
so that machine noise hits both alike, and the figure reported is the ratio of their median tokens/s, measured in
this run. Model-FLOPs utilisation is the model's training FLOPs per second (GPTConfig.flops_per_token) over the peak this
machine measures here, right now, for a square fp32 matmul at the same thread count.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from scaling_lab.conf import compose
from scaling_lab.pipeline.data import DataSettings, TokenDataModule, prepare_corpus
from scaling_lab.pipeline.runspec import plan_run
from scaling_lab.pipeline.throughput import matmul_peak
from scaling_lab.pipeline.train import build_module, build_trainer

DEFAULTS = ["model.n_layers=2", "model.d_model=64", "model.head_dim=16", "train.tokens=1_000_000",
            "train.threads=1", "train.progress_bar=false", "logger=none"]
REPEATS = 3


def plain_loop(t, spec, datamodule) -> float:
    """A hand-written loop doing what the Lightning run does: seconds for all steps."""
    torch.manual_seed(t.seed)
    module = build_module(t, spec)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    model = module.model.train()
    start = time.perf_counter()
    for x, y in datamodule.train_dataloader():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return time.perf_counter() - start


def lightning_loop(t, spec, datamodule) -> float:
    torch.manual_seed(t.seed)
    module = build_module(t, spec)
    trainer = build_trainer(t, spec, validate=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    cfg = compose("train", DEFAULTS + argv)
    corpus = prepare_corpus(cfg.data)
    spec = plan_run(cfg, vocab_size=corpus.vocab_size)
    torch.set_num_threads(spec.threads)
    m = spec.model
    print(f"model L={m.n_layers} d={m.d_model} heads={m.n_heads} seq={m.seq_len}; {spec.tokens:,} tokens in "
          f"{spec.total_steps} steps of {spec.batch_size} sequences; {spec.threads} thread(s)")
    times = {"plain": [], "lightning": []}
    for _ in range(REPEATS):
        for name, loop in (("plain", plain_loop), ("lightning", lightning_loop)):
            datamodule = TokenDataModule(corpus, DataSettings(
                seq_len=m.seq_len, batch_size=spec.batch_size, train_sequences=spec.tokens // m.seq_len,
                eval_tokens=cfg.data.eval_tokens, val_curve_tokens=cfg.data.val_curve_tokens, seed=cfg.train.seed))
            times[name].append(loop(cfg.train, spec, datamodule))
    peak = matmul_peak(spec.threads)
    flops_per_token = m.flops_per_token
    print(f"matmul peak (fp32, 1024^3, {spec.threads} thread(s)): {peak / 1e9:.1f} GFLOP/s")
    rates = {}
    for name, ts in times.items():
        rates[name] = spec.tokens / statistics.median(ts)
        mfu = rates[name] * flops_per_token / peak
        print(f"{name:<10} median {statistics.median(ts):6.2f} s  {rates[name]:>9,.0f} tokens/s  MFU {mfu:5.1%}  "
              f"(runs: {', '.join(f'{x:.2f}' for x in ts)})")
    print(f"Lightning / plain tokens/s: {rates['lightning'] / rates['plain']:.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
