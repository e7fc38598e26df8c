"""scaling-prepare: a corpus of any size tokenized once, in bounded memory and resumably, into the very cache a run
prepares for itself; runs and a sweep's pre-launch check only read a large corpus's cache."""

import json
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from scaling_lab.conf.train_schema import DataConf
from scaling_lab.fit.io.integrity import IntegrityError
from scaling_lab.pipeline.data import (BPETokenizer, ByteTokenizer, DataError, _doc_is_heldout, prepare_cache,
                                       prepare_corpus)
from scaling_lab.pipeline.sweep import plan_points
from scaling_lab.pipeline.train import run
from tests.helpers import TINY

BIN = Path(sys.executable).parent
WORDS = ("the a of river light house stone quiet morning letter garden walked answered slowly never again under "
         "window silver brother evening city long road winter above said ran old young small great").split()


def write_corpus(folder: Path, files: int, paragraphs: int, seed: int = 0) -> Path:
    """Text files of random paragraphs (the same for the same arguments)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(paragraphs)]
        (folder / f"part_{i:03d}.txt").write_text("\n\n".join(paras) + "\n")
    return folder


def data_cfg(cache: Path, path: Path, **kw):
    return OmegaConf.structured(DataConf(cache_dir=str(cache), source="files", path=str(path), sample_by="paragraph",
                                         val_fraction=0.1, **kw))


def prepare_args(cache: Path, path: Path, *overrides: str) -> list[str]:
    return [str(BIN / "scaling-prepare"), "data=files", f"data.path={path}", "data.val_fraction=0.1",
            f"data.cache_dir={cache}", *overrides]


def contents(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def todays_tokens(path: Path, tokenizer: str, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """What preparation did before scaling-prepare, all in memory: every document loaded, split by hash, the BPE
    trained on every training document, each split encoded in one batch."""
    import datasets

    ds = datasets.load_dataset("text", data_files=sorted(str(f) for f in path.iterdir()), split="train",
                               cache_dir=str(tmp / "hf"), sample_by="paragraph", encoding_errors="replace")
    docs = [t for t in ds["text"] if t]
    train = [d for d in docs if not _doc_is_heldout(d, 0.1)]
    val = [d for d in docs if _doc_is_heldout(d, 0.1)]
    tok = ByteTokenizer() if tokenizer == "bytes" else BPETokenizer(400, tmp / "tokenizer.json", train)
    return tok.encode_docs(train), tok.encode_docs(val)


# the keys of these two corpora's caches, as written before scaling-prepare existed: they must be found again
@pytest.mark.parametrize("tokenizer, key", [("bytes", "d9a7c5bad0e0ce80-bytes-bca3953830"),
                                            ("bpe", "d9a7c5bad0e0ce80-bpe400-bca3953830")])
def test_the_prepared_cache_is_the_one_a_run_prepares(tmp_path, tokenizer, key):
    docs = write_corpus(tmp_path / "docs", files=12, paragraphs=40)
    settings = [f"data.tokenizer={tokenizer}", "data.bpe_vocab_size=400", "data.prepare_chunk_bytes=2000"]
    out = subprocess.run(prepare_args(tmp_path / "a", docs, *settings), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    prepared = tmp_path / "a" / "tokens" / key  # many chunks
    assert str(prepared) in out.stdout and not (tmp_path / "a" / "tokens" / f"{key}.tmp").exists()
    corpus = prepare_corpus(data_cfg(tmp_path / "b", docs, tokenizer=tokenizer, bpe_vocab_size=400))  # one chunk
    assert corpus.dir.name == key
    assert contents(prepared) == contents(corpus.dir)  # byte for byte: tokens, tokenizer, meta and checksums
    assert {"train.bin", "val.bin", "meta.json", "token_bytes.npy", "train.bin.sha256"} <= set(contents(prepared))
    train, val = todays_tokens(docs, tokenizer, tmp_path)
    assert np.array_equal(corpus.tokens("train"), train) and np.array_equal(corpus.tokens("val"), val)
    assert corpus.meta["train_tokens"] == train.size and corpus.meta["val_documents"] > 0


def test_a_bpe_sample_smaller_than_the_corpus_is_its_first_bytes_and_its_own_cache(tmp_path):
    docs = write_corpus(tmp_path / "docs", files=4, paragraphs=40)
    whole = prepare_cache(data_cfg(tmp_path / "c", docs, tokenizer="bpe", bpe_vocab_size=300))
    sampled = prepare_cache(data_cfg(tmp_path / "c", docs, tokenizer="bpe", bpe_vocab_size=300,
                                     bpe_sample_bytes=2000))
    assert sampled.dir != whole.dir and sampled.meta["settings"]["bpe_sample_bytes"] == 2000
    assert "bpe_sample_bytes" not in whole.meta["settings"]  # at its default: the key and meta of before
    assert sampled.meta["train_bytes"] == whole.meta["train_bytes"]  # the same text, other merges
    assert not np.array_equal(sampled.tokens("train")[:1000], whole.tokens("train")[:1000])


def _grow(folder: Path, base: Path, copies: int) -> Path:
    """``copies`` copies of ``base``'s files, each with its own first line (a larger corpus, quickly written)."""
    folder.mkdir()
    for i in range(copies):
        for f in base.iterdir():
            (folder / f"{i:03d}_{f.name}").write_text(f"copy {i}\n\n" + f.read_text())
    return folder


@pytest.mark.slow
def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path):
    base = write_corpus(tmp_path / "base", files=4, paragraphs=800)  # ~650 kB
    prepare_cache(data_cfg(tmp_path / "c", base))  # imports and first-use allocations, before measuring
    peaks, sizes = {}, {}
    for copies in (1, 8):
        corpus = _grow(tmp_path / f"x{copies}", base, copies)
        sizes[copies] = sum(f.stat().st_size for f in corpus.iterdir())
        tracemalloc.start()
        prepare_cache(data_cfg(tmp_path / "c", corpus, prepare_chunk_bytes=50_000))
        peaks[copies] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 8x the corpus, the same memory (a fixed ~10 MB: `datasets`' read buffer); held whole, the 4.6 MB more text
    # would have taken 3x that more (the text, then its tokens: 2 bytes each)
    assert peaks[8] < peaks[1] + 0.5 * (sizes[8] - sizes[1]), (peaks, sizes)


@pytest.mark.slow
def test_a_killed_preparation_continues_where_it_stopped(tmp_path):
    docs = _grow(tmp_path / "docs", write_corpus(tmp_path / "base", files=4, paragraphs=500), 3)
    args = prepare_args(tmp_path / "a", docs, "data.tokenizer=bpe", "data.bpe_vocab_size=400",
                        "data.prepare_chunk_bytes=20000")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tokens = tmp_path / "a" / "tokens"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        progress = list(tokens.glob("*.tmp/progress.json")) if tokens.exists() else []
        if progress and json.loads(progress[0].read_text())["documents"] > 0:  # its first chunks are written
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the preparation finished before it could be killed"
    (tmp,) = tokens.glob("*.tmp")
    done = json.loads((tmp / "progress.json").read_text())["documents"]
    assert 0 < done and not any((tokens / tmp.name[:-4]).glob("meta.json"))

    out = subprocess.run(args, capture_output=True, text=True)  # launched again: it continues
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = tokens / tmp.name[:-4]
    assert not tmp.exists() and "progress.json" not in contents(resumed)
    whole = prepare_corpus(data_cfg(tmp_path / "b", docs, tokenizer="bpe", bpe_vocab_size=400))  # never killed
    assert contents(resumed) == contents(whole.dir)


def test_a_hub_dataset_needs_scaling_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no connection tried: the size of a hub dataset is unknown anyway
    cfg = OmegaConf.structured(DataConf(cache_dir=str(tmp_path), source="hub", name="some/set", tokenizer="bpe"))
    with pytest.raises(DataError, match="size is unknown .*`scaling-prepare data=hub data.name=some/set "):
        prepare_corpus(cfg)


@pytest.mark.slow
def test_a_large_corpus_is_prepared_once_then_runs_and_sweep_checks_only_read_it(tmp_path, compose_train):
    docs = write_corpus(tmp_path / "docs", files=8, paragraphs=200)  # ~320 kB, over the threshold below
    data = ["data=files", f"data.path={docs}", "data.val_fraction=0.1", f"data.cache_dir={tmp_path / 'cache'}",
            "data.prepare_threshold_bytes=100000"]
    cfg = compose_train(*data, "sweep.name=big")
    with pytest.raises(DataError) as err:
        run(cfg)
    message = str(err.value)
    assert "\n" not in message and "prepare_threshold_bytes=100,000" in message
    command = re.search(r"`(scaling-prepare [^`]*)`", message).group(1)
    assert command.startswith(f"scaling-prepare data=files data.path={docs} ")
    out = subprocess.run([str(BIN / "scaling-prepare"), *shlex.split(command)[1:]], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]

    record = run(cfg)
    assert record["status"] == "ok", record.get("error")
    assert record["tokens"]["seen"] == 16384

    (cache,) = [d for d in (tmp_path / "cache" / "tokens").iterdir() if d.is_dir()]
    train = cache / "train.bin"
    damaged = bytearray(train.read_bytes())
    damaged[100] ^= 1
    train.write_bytes(bytes(damaged))  # a token file the check would refuse if it read it
    files = {f: f.stat().st_mtime_ns for f in tmp_path.joinpath("cache").rglob("*")}
    common = [*TINY, f"results_dir={tmp_path / 'results'}", *data]
    start = time.time()
    points = plan_points([[*common, f"model.n_layers={n}"] for n in (1, 2)] + [[*common, "train.tokens=1e9"]])
    assert time.time() - start < 10
    assert [p.error for p in points[:2]] == [None, None] and "exceeds" in points[2].error  # only meta.json read
    assert {f: f.stat().st_mtime_ns for f in tmp_path.joinpath("cache").rglob("*")} == files  # nothing written
    with pytest.raises(IntegrityError):  # what a run, which reads the tokens, says
        prepare_corpus(cfg.data)
