"""GPU check (issue 24): what the training path does on one GPU, printed as figures. Never part of ``make test``.

    .venv/bin/python scripts/gpu_check.py [--out scripts/output/gpu_check.txt]   (at most 8 minutes on one H100)
    .venv/bin/python scripts/gpu_check.py --dry-run --out gpu_dry.txt            (the same code paths on the CPU)

Run it by hand where a GPU is lent. On the lent device machine, Hydra, wandb, datasets and torchao are installed from
wheels first: see the device README. Without a GPU it refuses in one line (exit 2); ``--dry-run`` runs every part on
the CPU at tiny sizes (2 layers x 64 wide, 20 steps, fp32, a few hundred tokens of latency, serving at 1-4 layers x
32-128 wide) so the script itself can be checked on any machine.

It prints, each part as soon as it is done (a part that fails prints its one-line error and the next part runs):

1. the corpus: the embedded stdlib corpus with the bytes tokenizer (vocab 257) -- the only one guaranteed on a
   machine without a network -- and whether 200 steps x batch x 1024 tokens fit its training tokens (the batch is
   halved until they do);
2. training speed of two shapes of the paper_small preset (conf/launch/sweep/paper_small.yaml: head_dim 64,
   seq_len 1024), 22 layers x 576 and 3 x 1472 wide, 200 steps each in eager mode and with train.compile=true, through
   the real training path (``pipeline.train.run``, train=gpu: bf16-mixed): steady-state tokens/s, MFU (over the
   device's datasheet peak) and peak GPU memory. With the bytes tokenizer the shapes' FLOPs lack the 16k-vocab head;
3. one WSD branch (4 x 256, train.schedule=wsd, 10 warmup steps, decay_frac 0.25) run by ``scaling-train`` as a
   subprocess, stopped by SIGTERM during its decay and relaunched: the record must be ok, with every token of its
   budget seen, in two attempts;
4. inference latency as the records measure it (the record's ``latency`` section of the WSD run: its serving copy
   on the training device, bf16 with CUDA-graph decode on a GPU): prefill and per-token decode at batch 1 and the
   larger batch, with the device, dtype, threads and graph mode it names;
5. serving, measured on the device as served (``pipeline/device.py``): latency of the two shapes of part 2 (with
   paper_small's 16k vocabulary and latency protocol, randomly initialised) in fp32 and bf16, decode eager and
   replayed as a CUDA graph; the latency law (``scaling-latency``) fitted on 8 paper_small-like shapes in bf16, once
   eager and once graphed, its per-call and per-layer terms side by side; INT8 and INT4 (``pipeline.serving.quantize``)
   against bf16: held-out loss delta on the WSD run's trained model, weight bytes, decode ms/token there and on the
   3 x 1472 shape (a mode that fails prints its one-line reason and the next runs); one speculative pair
   (``scaling-speculate``: the WSD run as target, a 2 x 128 draft trained here for 100 steps). The dry run measures
   eagerly only (a CUDA graph needs CUDA) and quantizes with the CPU kernels;

under a header (device, versions, date), with the total wall time at the end. Everything printed also goes to --out.
Exit status: 0 when every part passed, 1 otherwise, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from scaling_lab.conf import compose, fail
from scaling_lab.fit.io import store

OUT_DEFAULT = Path(__file__).resolve().parent / "output" / "gpu_check.txt"
SWEEP = "paper_small"
# The preset, on the corpus every machine has: the embedded stdlib corpus, bytes tokenizer. Its held-out split
# (~2% of ~30-60 MB) is smaller than the preset's 1M evaluation tokens, so the check evaluates on fewer.
PRESET = [f"sweep={SWEEP}", "data=stdlib", "data.tokenizer=bytes", "data.eval_tokens=131072", "logger=none",
          "train.progress_bar=false"]


@dataclass
class Settings:
    """What the check runs: the GPU sizes, or the dry run's tiny ones on the CPU."""

    dry_run: bool
    shapes: list[tuple[int, int]]
    steps: int
    batch_size: int
    seq_len: int
    train_group: list[str]
    eval_tokens: list[str] = field(default_factory=list)
    wsd_shape: tuple[int, int] = (4, 256)
    wsd_steps: int = 400
    wsd_batch_size: int = 16
    latency: list[str] = field(default_factory=list)
    child_timeout_s: float = 300.0
    # serving (part 5): randomly initialised shapes of paper_small's family, its latency protocol
    serving_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(22, 576), (3, 1472)])
    law_shapes: list[tuple[int, int]] = field(default_factory=lambda: [
        (3, 1472), (22, 576), (5, 1152), (8, 896), (13, 704), (3, 768), (8, 512), (22, 320)])
    head_dim: int = 64
    vocab_size: int = 16384
    serving_seq_len: int = 1024
    protocol: dict = field(default_factory=lambda: {"prompt_len": 256, "decode_tokens": 128, "batch_sizes": [1, 16],
                                                    "warmup": 2, "repeats": 5})
    draft_shape: tuple[int, int] = (2, 128)
    draft_steps: int = 100
    new_tokens: int = 64

    @classmethod
    def gpu(cls, batch_size: int) -> "Settings":
        # paper_small's latency protocol (prompt 256, decode 128, batch 1 and 16) is kept
        return cls(dry_run=False, shapes=[(22, 576), (3, 1472)], steps=200, batch_size=batch_size, seq_len=1024,
                   train_group=["train=gpu"])

    @classmethod
    def dry(cls) -> "Settings":
        return cls(dry_run=True, shapes=[(2, 64)], steps=20, batch_size=4, seq_len=1024,
                   train_group=["train=default", "train.accelerator=cpu", "train.precision=32-true"],
                   eval_tokens=["data.eval_tokens=8192", "data.val_curve_tokens=2048"],
                   wsd_shape=(2, 64), wsd_steps=40, wsd_batch_size=4,
                   latency=["latency.prompt_len=64", "latency.decode_tokens=32", "latency.batch_sizes=[1,4]",
                            "latency.warmup=1", "latency.repeats=2"],
                   child_timeout_s=240.0,
                   serving_shapes=[(2, 64), (1, 128)],
                   law_shapes=[(1, 64), (2, 64), (1, 128), (2, 128), (3, 96), (4, 32)], head_dim=32, vocab_size=257,
                   serving_seq_len=128,
                   protocol={"prompt_len": 16, "decode_tokens": 8, "batch_sizes": [1, 4], "warmup": 1, "repeats": 2},
                   draft_shape=(1, 64), draft_steps=20, new_tokens=16)


class Report:
    """Prints to stdout and to the --out file, flushing each line (a part shows as soon as it is done)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file = path, path.open("w")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----- helpers -------------------------------------------------------------------------------------------------

def overrides(s: Settings, work: Path, label: str, n_layers: int, d_model: int, steps: int, batch_size: int,
              *extra: str) -> list[str]:
    """The train-config overrides of one run of the check (its own results folder, the shared token cache)."""
    return [*PRESET, *s.train_group, *s.eval_tokens, f"model.n_layers={n_layers}", f"model.d_model={d_model}",
            f"model.seq_len={s.seq_len}", f"train.batch_size={batch_size}",
            f"train.tokens={steps * batch_size * s.seq_len}", f"results_dir={work / 'results' / label}",
            f"data.cache_dir={work / 'cache'}", *extra]


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:400]}" if text else type(err).__name__


def gib(n: float | None) -> str:
    return f"{n / 2**30:.2f} GiB" if n is not None else "n/a"


def cuda() -> bool:
    return torch.cuda.is_available()


def train_script() -> list[str]:
    """``scaling-train`` as installed beside this interpreter (else on PATH, else run as a module)."""
    beside = Path(sys.executable).parent / "scaling-train"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("scaling-train")
    return [found] if found else [sys.executable, "-m", "scaling_lab.pipeline.train"]


class Child:
    """A subprocess whose merged output is read line by line on a thread, so waiting for a line has a timeout."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, match, timeout: float) -> re.Match | None:
        """The first line (from now on) that ``match`` (a compiled regex's search) accepts; None if the process
        ended first. Raises TimeoutError after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                raise TimeoutError(f"no matching line in {timeout:.0f} s; last output: {self.tail()}") from None
            if line is None:
                return None
            self.lines.append(line)
            found = match(line)
            if found:
                return found

    def finish(self, timeout: float) -> int:
        """Read the rest of the output and the exit status (the process is killed after ``timeout`` seconds)."""
        try:
            self.wait_for(lambda line: None, timeout)
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 3) -> str:
        return " | ".join(x.strip() for x in self.lines[-n:])


def check_record(record: dict) -> None:
    if record.get("status") != "ok":
        raise RuntimeError(f"run {record.get('run_id')} ended {record.get('status')}: {record.get('error')}")


# ----- the parts -----------------------------------------------------------------------------------------------

def header(s: Settings, report: Report) -> None:
    import lightning

    device = torch.cuda.get_device_name(0) if cuda() else "none (CPU dry run)"
    report(f"GPU check (issue 24){' -- DRY RUN on the CPU at tiny sizes' if s.dry_run else ''}")
    report(f"date {datetime.now(timezone.utc).isoformat(timespec='seconds')}  host {platform.node()}")
    report(f"device {device}" + (f" ({gib(torch.cuda.get_device_properties(0).total_memory)}), CUDA "
                                 f"{torch.version.cuda}" if cuda() else ""))
    report(f"python {platform.python_version()}  torch {torch.__version__}  lightning {lightning.__version__}  "
           f"scaling-lab {store.tool_version()}")
    report()


def part_corpus(s: Settings, work: Path, report: Report, ctx: dict) -> None:
    """The stdlib corpus's token cache (prepared here, in the temp folder); the batch halved until the runs fit."""
    from scaling_lab.pipeline.data import prepare_corpus, unique_windows

    h, w = s.shapes[0]
    cfg = compose("train", overrides(s, work, "corpus", h, w, s.steps, s.batch_size))
    began = time.time()
    corpus = prepare_corpus(cfg.data)
    meta = corpus.meta
    available = unique_windows(meta["train_tokens"], s.seq_len) * s.seq_len
    batch = s.batch_size
    while batch > 1 and s.steps * batch * s.seq_len > available:
        batch //= 2
    if s.steps * batch * s.seq_len > available:
        raise RuntimeError(f"{s.steps} steps x 1 x {s.seq_len} tokens exceed the corpus's {available:,} unique "
                           "training tokens")
    s.batch_size = ctx["batch_size"] = batch
    if s.wsd_steps * s.wsd_batch_size * s.seq_len > available:
        s.wsd_steps = available // (s.wsd_batch_size * s.seq_len)
    report(f"corpus {meta['corpus']} ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}): "
           f"{meta['train_tokens']:,} training / {meta['val_tokens']:,} held-out tokens, cache prepared in "
           f"{time.time() - began:.0f} s")
    report(f"  the only corpus guaranteed without a network; paper_small's 16k BPE is replaced by bytes, so the "
           f"shapes' FLOPs below lack the 16k-vocab head")
    lowered = f"; batch lowered from the requested {ctx['requested_batch']}" if batch != ctx["requested_batch"] else ""
    report(f"  {s.steps} steps x batch {batch} x {s.seq_len} = {s.steps * batch * s.seq_len:,} tokens per run "
           f"(fits {available:,} unique training tokens){lowered}")


def part_throughput(s: Settings, work: Path, report: Report, ctx: dict) -> None:
    """Each shape, eager then compiled: steady-state tokens/s, MFU and peak GPU memory of the real training path."""
    from scaling_lab.pipeline.train import run

    failures = 0
    for n_layers, d_model in s.shapes:
        for mode in ("eager", "compile"):
            label = f"{n_layers}x{d_model}-{mode}"
            try:
                cfg = compose("train", overrides(s, work, label, n_layers, d_model, s.steps, s.batch_size,
                                                 f"train.compile={str(mode == 'compile').lower()}",
                                                 "latency.enabled=false"))
                gc.collect()
                if cuda():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                if mode == "compile":
                    torch._dynamo.reset()  # each compiled run compiles its own model, timed as a user's would be
                began = time.time()
                record = run(cfg)
                wall = time.time() - began
                peak_mem = torch.cuda.max_memory_allocated() if cuda() else None
                check_record(record)
                t, hw, p = record["timing"], record["hardware"], record["params"]
                if "shape" not in ctx:
                    report(f"training speed: {s.steps} steps of batch {s.batch_size} x {s.seq_len}, "
                           f"{hw['precision']} on {hw['device']}; peak {hw['peak_flops'] or 0:.3g} FLOP/s "
                           f"({hw['peak_source']})")
                    ctx["shape"] = True
                mfu = f"{100 * t['mfu']:.1f}%" if t.get("mfu") is not None else "n/a"
                steady = f"{t['tokens_per_s_steady']:,.0f}" if t.get("tokens_per_s_steady") else "n/a"
                report(f"  {n_layers:>2} x {d_model:<4} {mode:<7}: {steady:>9} tokens/s steady  MFU {mfu:>5}  "
                       f"peak memory {gib(peak_mem) if cuda() else 'n/a (CPU)'}  "
                       f"({p['non_embedding'] / 1e6:.1f}M non-embedding params, "
                       f"{record['flops']['per_token'] / 1e6:.0f} MFLOP/token; train {t['train_s']:.1f} s, "
                       f"run {wall:.1f} s)")
            except Exception as err:  # noqa: BLE001 - one failed run is reported and the next one runs
                failures += 1
                report(f"  {n_layers:>2} x {d_model:<4} {mode:<7}: FAILED {one_line(err)}")
    if failures:
        raise RuntimeError(f"{failures} of {2 * len(s.shapes)} runs failed (above)")


def part_wsd_resume(s: Settings, work: Path, report: Report, ctx: dict) -> None:
    """A WSD branch trained by ``scaling-train``, SIGTERMed during its decay, relaunched; its record checked."""
    n_layers, d_model = s.wsd_shape
    results = work / "results" / "wsd"
    args = [*train_script(), *overrides(s, work, "wsd", n_layers, d_model, s.wsd_steps, s.wsd_batch_size,
                                        "train.schedule=wsd", "train.warmup_steps=10", "train.decay_frac=0.25",
                                        "train.save_model=true",
                                        "train.progress_every_s=0", *s.latency)]
    decay_start = s.wsd_steps - round(0.25 * s.wsd_steps)
    stop_at = decay_start + max(1, (s.wsd_steps - decay_start) // 5)
    progress = re.compile(r"step (\d+)/(\d+) ")
    began = time.time()

    first = Child(args)
    try:
        seen = first.wait_for(lambda line: (m := progress.search(line)) and int(m.group(1)) >= stop_at and m,
                              s.child_timeout_s)
        if seen is None:
            raise RuntimeError(f"scaling-train ended (exit {first.proc.wait()}) before step {stop_at}: {first.tail()}")
        first.proc.send_signal(signal.SIGTERM)
        code = first.finish(s.child_timeout_s)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait()
    said = next((x.strip() for x in first.lines if x.startswith("interrupted:")), None)
    if code == 0 or said is None:
        raise RuntimeError(f"SIGTERM at step {seen.group(1)} did not interrupt the run (exit {code}): {first.tail()}")
    report(f"WSD branch with resume: {n_layers} x {d_model}, {s.wsd_steps} steps of batch {s.wsd_batch_size} "
           f"(10 warmup, decay from step {decay_start}); SIGTERM after step {seen.group(1)}: exit {code}")
    report(f"  {said}")

    second = Child(args)
    code = second.finish(s.child_timeout_s)
    if code != 0:
        raise RuntimeError(f"the relaunch exited {code}: {second.tail()}")
    records = list(store.iter_records(str(results), SWEEP))
    if len(records) != 1:
        raise RuntimeError(f"expected one record in {results}, found {len(records)}")
    record = ctx["wsd_record"] = records[0]
    tokens, attempts = record["tokens"], record.get("attempts") or []
    ended = [a.get("ended") for a in attempts]
    resumed = record["timing"].get("resumed_from_tokens") or 0
    checks = {"status ok": record["status"] == "ok",
              "tokens seen == budget": tokens.get("seen") == tokens.get("budget"),
              "two attempts (interrupted, ok)": len(attempts) == 2 and str(ended[0]).startswith("interrupted")
              and ended[1] == "ok",
              "resumed from a checkpoint": resumed > 0}
    report(f"  relaunch: exit 0, record {record['run_id']}: status {record['status']}, tokens seen "
           f"{tokens.get('seen'):,} of {tokens.get('budget'):,}, resumed from {resumed:,} tokens, attempts {ended}, "
           f"held-out loss {(record.get('loss') or {}).get('final', float('nan')):.4f} "
           f"({time.time() - began:.0f} s for both launches)")
    failed = [k for k, ok in checks.items() if not ok]
    report(f"  {'PASS' if not failed else 'FAIL'}: " + ", ".join(f"{k} {'yes' if ok else 'NO'}"
                                                              for k, ok in checks.items()))
    if failed:
        raise RuntimeError("the resumed WSD record fails: " + ", ".join(failed))


def part_latency(s: Settings, work: Path, report: Report, ctx: dict) -> None:
    """The record's latency section (of the WSD run; of a short run of the same shape if that part failed)."""
    from scaling_lab.pipeline.train import run

    record = ctx.get("wsd_record")
    source = "the WSD run's record"
    if record is None:
        n_layers, d_model = s.wsd_shape
        steps = max(20, s.steps // 4)
        record = run(compose("train", overrides(s, work, "latency", n_layers, d_model, steps, s.wsd_batch_size,
                                                *s.latency)))
        check_record(record)
        source = f"a {steps}-step run's record (the WSD part failed)"
    lat = record.get("latency")
    if not lat:
        raise RuntimeError(f"{source} has no latency section")
    shape = record["shape"]
    report(f"inference latency of the record (its serving copy on the training device): {source}, "
           f"{shape['n_layers']} x {shape['d_model']}, on {lat['device']} in {lat['dtype']}, decode "
           f"{lat.get('graph', 'eager (not recorded)')}, {lat['threads']} thread(s), prompt {lat['prompt_len']} "
           f"tokens, {lat['decode_tokens']} decoded, median of {lat['repeats']} after {lat['warmup']} warm-up")
    for b in lat["batch_sizes"]:
        per = lat["by_batch"][str(b)]
        report(f"  batch {b:>3}: prefill {per['prefill_ms']['median']:.3f} ms, decode "
               f"{per['decode_ms_per_token']['median']:.3f} ms/token")


def _serving_config(s: Settings, n_layers: int, d_model: int):
    from scaling_lab.models.shapes import GPTConfig

    return GPTConfig(n_layers=n_layers, d_model=d_model, n_heads=d_model // s.head_dim, vocab_size=s.vocab_size,
                     seq_len=s.serving_seq_len)


def _latency_line(result: dict) -> str:
    return ", ".join(f"batch {b}: decode {result['by_batch'][str(b)]['decode_ms_per_token']['median']:.3f} ms/token, "
                     f"prefill {result['by_batch'][str(b)]['prefill_ms']['median']:.2f} ms" for b in result["batch_sizes"])


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _trained_pair(s: Settings, work: Path, report: Report, ctx: dict) -> tuple[Path, dict, dict]:
    """The results folder, the target (the WSD run, with its weights; a short run of its shape if that part failed)
    and a small draft trained beside it, both with saved weights."""
    from scaling_lab.pipeline.train import run

    n_layers, d_model = s.wsd_shape
    target, label = ctx.get("wsd_record"), "wsd"
    if target is None or not target.get("weights"):
        label = "serving"
        target = run(compose("train", overrides(s, work, label, n_layers, d_model, max(20, s.steps // 4),
                                                s.wsd_batch_size, "train.save_model=true", *s.latency)))
        check_record(target)
        report(f"  target: a {n_layers} x {d_model} run trained here (the WSD part left no weights)")
    L, d = s.draft_shape
    draft = run(compose("train", overrides(s, work, label, L, d, s.draft_steps, s.wsd_batch_size,
                                           "train.save_model=true", "latency.enabled=false")))
    check_record(draft)
    return work / "results" / label, target, draft


def part_serving(s: Settings, work: Path, report: Report, ctx: dict) -> None:
    """Latency in fp32 and bf16, eager and graphed; the latency law eager and graphed; INT8/INT4 against bf16; one
    speculative pair: every figure on the device as served, naming its device, dtype, threads and graph mode."""
    import copy

    from scaling_lab.models.gpt import GPT
    from scaling_lab.pipeline import device as devices
    from scaling_lab.pipeline import serving, speculate
    from scaling_lab.pipeline.latency import measure, run_latency

    device = devices.resolve("auto")
    gpu = device.type == "cuda"
    p = s.protocol
    args = (p["prompt_len"], p["decode_tokens"], p["batch_sizes"], p["warmup"], p["repeats"])
    failures = []
    report(f"serving on {devices.device_name(device)}, {torch.get_num_threads()} thread(s): prompt {p['prompt_len']}, "
           f"{p['decode_tokens']} decoded, batches {p['batch_sizes']}, median of {p['repeats']} after {p['warmup']} "
           f"warm-up; vocab {s.vocab_size}, random weights; fp32 matmul precision "
           f"{torch.get_float32_matmul_precision()}" + ("" if gpu else "; a CUDA graph needs CUDA: eager only"))

    # 1. fp32 and bf16 (the serving dtype on CUDA), decode eager and replayed as a CUDA graph
    for n_layers, d_model in s.serving_shapes:
        torch.manual_seed(0)
        base = GPT(_serving_config(s, n_layers, d_model))
        for dtype in (torch.float32, torch.bfloat16):
            model = copy.deepcopy(base).to(device=device, dtype=dtype).eval()
            eager = None
            for graph in ((False, True) if gpu else (False,)):
                label = f"{n_layers:>2} x {d_model:<4} {str(dtype).replace('torch.', ''):<8} " \
                        f"{devices.graph_name(graph):<10}"
                try:
                    result = measure(model, *args, graph=graph)
                    eager = eager or result
                    gain = (f"  ({eager['decode_ms_per_token'] / result['decode_ms_per_token']:.2f}x eager's batch-1 "
                            f"decode)" if graph else "")
                    report(f"  {label}: {_latency_line(result)}{gain}")
                except Exception as err:  # noqa: BLE001 - one failed measurement is reported, the next one runs
                    failures.append(" ".join(label.split()))
                    report(f"  {label}: FAILED {one_line(err)}")
            del model
            _free(device)

    # 2. the latency law on paper_small-like shapes in the serving dtype, eager and graphed
    pairs = "[" + ",".join(f"[{L},{d}]" for L, d in s.law_shapes) + "]"
    for graph in (("false", "true") if gpu else ("false",)):
        try:
            section = run_latency(compose("latency_cli", [
                f"out={work / 'latency' / graph}", "logger=none", "shapes.n_layers=[]", f"shapes.pairs={pairs}",
                f"arch.head_dim={s.head_dim}", f"arch.vocab_size={s.vocab_size}", f"arch.seq_len={s.serving_seq_len}",
                f"measure.prompt_len={p['prompt_len']}", f"measure.decode_tokens={p['decode_tokens']}",
                f"measure.batch_sizes=[{','.join(map(str, p['batch_sizes']))}]", f"measure.warmup={p['warmup']}",
                f"measure.repeats={p['repeats']}", "measure.rounds=1", "measure.device=auto", f"measure.graph={graph}"]))
            c = section["modes"]["none"]["decode_ms_per_token"]
            err = section["heldout"]["none"]["decode_ms_per_token"]
            mape = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
            report(f"  latency law, {section['shapes']['count']} shapes, {section['device']} {section['dtype']} "
                   f"{section['graph']}: decode ms/token = {c['call']:.4g} + {c['layer']:.4g} L + "
                   f"{c['weight_bytes']:.3g} bytes + {c['matmul_flops']:.3g} FLOPs + {c['kv']:.3g} kv; "
                   f"leave-one-shape-out MAPE {mape(err['loso_mape'])}, largest shapes {mape(err['largest_mape'])}")
        except Exception as err:  # noqa: BLE001
            failures.append(f"latency law graph={graph}")
            report(f"  latency law (graph={graph}): FAILED {one_line(err)}")
        _free(device)

    # 3. INT8 and INT4 against the serving dtype, on the trained target and on the widest shape
    results, target, draft = _trained_pair(s, work, report, ctx)
    served = devices.serving_copy(serving.load_model(target, results), device)
    _, windows = serving.eval_windows(target)
    wide = max(s.serving_shapes, key=lambda shape: shape[1])
    torch.manual_seed(0)
    big = devices.serving_copy(GPT(_serving_config(s, *wide)), device)
    batch1 = (p["prompt_len"], p["decode_tokens"], [1], p["warmup"], p["repeats"])
    loss_ref, bytes_ref = serving.heldout_loss(served, windows), serving.weight_bytes(served)
    ref = {"small": measure(served, *batch1), "big": measure(big, *batch1)}
    dtype = ref["small"]["dtype"]
    report(f"  quantization against {dtype} ({ref['small']['graph']} decode, batch 1): target "
           f"{target['shape']['n_layers']} x {target['shape']['d_model']} (trained: held-out loss {loss_ref:.4f}, "
           f"{bytes_ref / 1e6:.2f} MB, {ref['small']['decode_ms_per_token']:.3f} ms/token); {wide[0]} x {wide[1]} "
           f"({serving.weight_bytes(big) / 1e6:.1f} MB, {ref['big']['decode_ms_per_token']:.3f} ms/token)")
    for mode in ("int8", "int4"):
        try:
            q, rep = serving.quantize(served, mode)
            qbig, rep_big = serving.quantize(big, mode)
            lat, lat_big = measure(q, *batch1), measure(qbig, *batch1)
            report(f"    {mode}: loss {serving.heldout_loss(q, windows) - loss_ref:+.5f} nats, bytes "
                   f"{serving.weight_bytes(q) / bytes_ref:.2f}x, decode {lat['decode_ms_per_token']:.3f} ms/token "
                   f"({ref['small']['decode_ms_per_token'] / lat['decode_ms_per_token']:.2f}x); {wide[0]} x {wide[1]}: "
                   f"bytes {serving.weight_bytes(qbig) / serving.weight_bytes(big):.2f}x, decode "
                   f"{lat_big['decode_ms_per_token']:.3f} ms/token "
                   f"({ref['big']['decode_ms_per_token'] / lat_big['decode_ms_per_token']:.2f}x); "
                   f"{len(rep['quantized'])} + {len(rep_big['quantized'])} Linears packed "
                   f"({rep.get('config', mode)}), decode {lat['graph']}")
            del q, qbig
        except Exception as err:  # noqa: BLE001 - a mode that fails is reported in one line, the next one runs
            failures.append(mode)
            report(f"    {mode}: FAILED {one_line(err)}")
        _free(device)
    del served, big

    # 4. one speculative pair, through scaling-speculate
    try:
        doc = speculate.run(compose("speculate", [
            f"results_dir={results}", f"sweep={SWEEP}", f"targets=[{target['run_id']}]",
            f"drafts=[{draft['run_id']}]", "ks=[2,4]", "modes=[greedy,sampled]", "prompts=2", "prompt_len=16",
            f"new_tokens={s.new_tokens}", "repeats=2", "device=auto", "logger=none", f"out={work / 'speculate'}"]))
        report(f"  speculative decoding on {doc['device']} in {doc['dtype']} ({doc['graph']}): target "
               f"{target['shape']['n_layers']} x {target['shape']['d_model']}, draft {s.draft_shape[0]} x "
               f"{s.draft_shape[1]} ({s.draft_steps} steps)")
        for r in doc["rows"]:
            report(f"    {r['mode']:<7} k={r['k']}: acceptance {r['acceptance_rate']:.3f}, "
                   f"{r['tokens_per_target_step']:.2f} tokens/step, cost ratio {r['cost_ratio']:.2f}, speedup "
                   f"{r['speedup_measured']:.2f}x (formula {r['speedup_predicted']:.2f}x)"
                   + ("" if r["greedy_exact"] is None else f", greedy exact {r['greedy_exact']}"))
    except Exception as err:  # noqa: BLE001
        failures.append("speculative decoding")
        report(f"  speculative decoding: FAILED {one_line(err)}")
    if failures:
        raise RuntimeError(f"{len(failures)} serving measurement(s) failed: "
                           + "; ".join(failures))


PARTS = [("corpus", part_corpus), ("training speed", part_throughput), ("WSD resume", part_wsd_resume),
         ("latency", part_latency), ("serving", part_serving)]


# ----- main ----------------------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run every part on the CPU at tiny sizes (no GPU needed), to check the script")
    ap.add_argument("--out", type=Path, default=OUT_DEFAULT, help=f"also write the output here (default {OUT_DEFAULT})")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="sequences per step of the training-speed runs (halved until 200 steps fit the corpus)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (records, token cache) and print it")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not args.dry_run and not cuda():
        fail("gpu_check", "no CUDA GPU here (torch.cuda.is_available() is false); run it where a GPU is lent, or "
                          "with --dry-run to check it on the CPU at tiny sizes")
    s = Settings.dry() if args.dry_run else Settings.gpu(args.batch_size)
    report = Report(args.out)
    began = time.time()
    failed = []
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = {"requested_batch": s.batch_size}
    try:
        header(s, report)
        for name, part in PARTS:
            t0 = time.time()
            try:
                part(s, work, report, ctx)
                report(f"  [{name}: {time.time() - t0:.0f} s]")
            except Exception as err:  # noqa: BLE001 - a failed part is reported in one line; the next one runs
                failed.append(name)
                report(f"{name}: FAILED after {time.time() - t0:.0f} s: {one_line(err)}")
                if args.dry_run:  # the dry run is for checking the script: show where
                    traceback.print_exc()
            report()
        report(f"total wall time {time.time() - began:.0f} s; "
               + (f"FAILED parts: {', '.join(failed)}" if failed else "all parts passed"))
        if args.keep:
            report(f"kept {work}")
        report(f"(written to {args.out})")
    finally:
        report.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
