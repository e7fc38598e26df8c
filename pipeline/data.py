"""Corpora, tokenizers and the token cache, loaded with Hugging Face ``datasets`` in every case.

``prepare_corpus(cfg)`` streams documents (the Python standard library's own source, the user's files, or a hub
dataset), splits them into train and held-out by a hash of each document (or by the user's own validation files),
tokenizes them once, chunk by chunk, and caches the tokens as memory-mapped ``uint16`` files keyed by the corpus hash
and the tokenizer (and every data setting that changes the tokens or the split). Memory stays bounded whatever the
corpus's size: the BPE learns from a bounded sample, and a killed preparation continues where it stopped. A small
corpus is prepared by the first run that needs it; a larger one (over ``data.prepare_threshold_bytes``, or any hub
dataset) once beforehand by ``scaling-prepare`` (``prepare_cache``), and runs only read its cache.

``TokenDataModule`` serves fixed-length windows from that cache to Lightning: training windows are a seeded
permutation of non-overlapping windows, so a run of D tokens sees D distinct training tokens, never an epoch repeat. The final evaluation slice (``heldout_windows``)
is spread over the whole held-out split: one seeded window in each of ``n`` equal strata of it, so it samples many
documents, and it is the same for every run of a corpus, tokenizer and context length; the validation curve uses
its own, disjoint windows.
"""

from __future__ import annotations

import codecs
import collections
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urlparse

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Sampler

from scaling_lab.conf import CONF_DIR, UserError
from scaling_lab.conf.train_schema import ALWAYS, RUN_IDENTITY
from scaling_lab.fit.io import integrity
from scaling_lab.fit.io.files import write_json_atomic

EOT = "<|endoftext|>"
SPLITS = ("train", "val")
TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".py": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}


class DataError(UserError):
    """Bad data configuration: raised before any training starts."""


@dataclass
class Corpus:
    """A tokenized corpus in the cache: memory-mapped train and held-out token streams and their metadata."""

    dir: Path
    meta: dict

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.dir / f"{split}.bin", dtype=np.uint16, mode="r")

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token on the whole held-out split (the evaluation uses its own slice's bytes)."""
        return self.meta["val_bytes"] / self.meta["val_tokens"]

    @property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for the end-of-text token)."""
        path = self.dir / "token_bytes.npy"
        if path.exists():
            return np.load(path)
        return token_byte_lengths(self.meta["tokenizer"], self.dir / "tokenizer.json", self.meta["eot"],
                                  self.meta["vocab_size"])


# ----- documents -----------------------------------------------------------------------------------------------

def stdlib_files() -> list[Path]:
    """The ``.py`` files of the standard library of the interpreter running this code (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def _expand(path: str) -> list[Path]:
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
    else:
        files = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
    if not files:
        raise DataError(f"data.path={path!r} matches no {'/'.join(TEXT_SUFFIXES)} file")
    builders = {TEXT_SUFFIXES.get(f.suffix, "text") for f in files}
    if len(builders) > 1:
        raise DataError(f"data.path={path!r} mixes file kinds {sorted(builders)}; point it at one kind")
    return files


def _files_hash(files: list[Path], root: Path | None) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if root else f.name).encode() + b"\0")
        with open(f, "rb") as data:  # in blocks: one file can be larger than memory
            while block := data.read(integrity.BLOCK):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def check_text(files: list[Path], builder: str, encoding: bool = True) -> None:
    """A corpus is text: a file with a NUL byte or mostly undecodable bytes (a binary, random bytes) is refused,
    and so is a JSONL line that is not a JSON object; the message names the file and the line. Each file is read
    line by line in bounded memory, whatever its size."""
    if builder == "parquet":
        return
    for f in files:
        try:
            _check_text_file(f, encoding)
        except OSError as err:
            raise DataError(f"{f}: cannot read the corpus file ({err.strerror or err})") from None


def _check_text_file(f: Path, encoding: bool, block: int = 1 << 20) -> None:
    size = bad = 0
    first_bad = None  # the line of the first undecodable byte
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character cut by a block is not bad
    jsonl = f.suffix == ".jsonl"
    line_no = 1
    with open(f, "rb") as stream:
        # a JSON line is read whole (its document is held whole anyway); text in blocks of at most `block` bytes
        for piece in iter(lambda: stream.readline(-1 if jsonl else block), b""):
            if b"\0" in piece:
                raise DataError(f"{f}:{line_no}: not a text file (a NUL byte); a corpus must be text")
            text = decoder.decode(piece)
            size += len(piece)
            if "\ufffd" in text:
                bad += text.count("\ufffd")
                first_bad = first_bad or line_no
            if jsonl and text.strip():
                try:
                    row = json.loads(text)
                except ValueError as err:
                    raise DataError(f"{f}:{line_no}: not a JSON line ({err.args[0] if err.args else err})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{f}:{line_no}: a JSONL corpus line must be a JSON object, not "
                                    f"{type(row).__name__}")
            line_no += piece.endswith(b"\n")
    bad += decoder.decode(b"", final=True).count("\ufffd")
    if encoding and size and bad > 0.05 * size:
        raise DataError(f"{f}:{first_bad or line_no}: not a text file ({bad:,} bytes are not UTF-8); a corpus must "
                        "be text")


def _file_documents(files: list[Path], cfg) -> Iterator[str]:
    """The non-empty documents of ``files`` in order, streamed by ``datasets`` (no copy of the corpus is held or
    written)."""
    import datasets

    builder = TEXT_SUFFIXES.get(files[0].suffix, "text")
    kwargs = {"sample_by": cfg.sample_by, "encoding_errors": "replace"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs)
    field = str(cfg.text_field)
    for i, row in enumerate(ds):
        if i == 0 and field not in row:
            raise DataError(f"{files[0]}: no column {field!r} (columns: {list(row)}); set data.text_field")
        if row.get(field):
            yield row[field]


def check_files(info: dict) -> None:
    """The corpus's files are text (``check_text``), before any is tokenized."""
    files = info["files"] + info["val_files"]
    if files:
        # the interpreter's own stdlib has a few test files in legacy encodings on purpose: only NUL bytes refuse it
        check_text(files, TEXT_SUFFIXES.get(files[0].suffix, "text"),
                   encoding=not str(files[0]).startswith(sysconfig.get_paths()["stdlib"]))


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``, as huggingface_hub reads it) accepts a connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_hub(cfg) -> None:
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not _hub_reachable():
        raise DataError(f"data=hub: the Hugging Face Hub cannot be reached from this machine, so {cfg.name!r} cannot "
                        "be downloaded; use data=stdlib or data=files data.path=<your files>")


def _hub_documents(cfg) -> Iterator[str]:
    """The hub dataset's rows in order (empty ones too), until ``max_bytes`` characters have been read."""
    import datasets

    _check_hub(cfg)
    ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, streaming=cfg.streaming,
                               cache_dir=str(Path(cfg.cache_dir) / "hf"))
    size, field, cap = 0, str(cfg.text_field), cfg.max_bytes
    for row in ds:
        text = row.get(field) or ""
        yield text
        size += len(text)
        if cap and size >= cap:
            return


def _doc_is_heldout(text: str, fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < fraction


def describe_corpus(cfg) -> dict:
    """What a data config names: its files and provenance (corpus, content hash, python version), cheaply, without
    loading it, so a cached tokenization is found before any document is read. Bad paths fail here."""
    info = {"source": cfg.source, "python": sys.version.split()[0], "files": [], "val_files": []}
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        info.update(corpus=f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib", files=stdlib_files())
        info["corpus_hash"] = _files_hash(info["files"], root)
    elif cfg.source == "files":
        if not cfg.path:
            raise DataError("data=files needs data.path=<dir or glob>")
        info.update(corpus=str(cfg.path), files=_expand(cfg.path), val_files=_expand(cfg.val_path) if cfg.val_path else [])
        info["corpus_hash"] = _files_hash(info["files"] + info["val_files"], None)
    elif cfg.source == "hub":
        if not cfg.name:
            raise DataError("data=hub needs data.name=<dataset id>")
        key = json.dumps([cfg.name, cfg.subset, cfg.split, cfg.max_bytes]).encode()
        info.update(corpus=f"hub:{cfg.name}", corpus_hash=hashlib.sha256(key).hexdigest())
    else:
        raise DataError(f"data.source={cfg.source!r}: choose stdlib, files or hub")
    if cfg.max_bytes:
        info["corpus_hash"] = hashlib.sha256(f"{info['corpus_hash']}:{cfg.max_bytes}".encode()).hexdigest()
    return info


def documents(cfg, info: dict) -> Iterator[tuple[str, str]]:
    """Every document of the corpus ``describe_corpus`` found, in order, with its split ("train" or "val"): the
    held-out files' documents, or else a hash split of all documents by ``val_fraction``. With ``max_bytes`` the
    training documents stop after that many bytes (a hub stream stops there); the held-out split stays the same."""
    docs = _hub_documents(cfg) if cfg.source == "hub" else _file_documents(info["files"], cfg)
    # the settings read once: a config's attribute access costs more than hashing a document
    size, hash_split, fraction = 0, not info["val_files"], float(cfg.val_fraction)
    cap = cfg.max_bytes if cfg.source != "hub" else None
    for text in docs:
        split = "val" if hash_split and _doc_is_heldout(text, fraction) else "train"
        if split == "train" and cap:
            if size >= cap:
                continue
            size += len(text.encode("utf-8", "replace"))
        yield split, text
    if info["val_files"]:
        yield from (("val", text) for text in _file_documents(info["val_files"], cfg))


def bpe_sample(cfg, info: dict) -> Iterator[str]:
    """What the BPE learns from: the first ``bpe_sample_bytes`` of training text (the last document cut there), so
    its memory is bounded. A corpus smaller than that is learnt whole: the tokenizer trained on everything."""
    left = cfg.bpe_sample_bytes
    for split, text in documents(cfg, info):
        if split != "train":
            continue
        data = text.encode("utf-8", "replace")
        if left is not None and len(data) > left:
            yield data[:left].decode("utf-8", "ignore")
            return
        yield text
        if left is not None:
            left -= len(data)
            if not left:
                return


# ----- tokenizers ----------------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes, plus one end-of-text token (id 256)."""

    vocab_size = 257
    eot = 256
    name = "bytes"

    def encode_docs(self, docs: list[str]) -> np.ndarray:
        parts = []
        for d in docs:
            parts.append(np.frombuffer(d.encode("utf-8", "replace"), dtype=np.uint8).astype(np.uint16))
            parts.append(np.array([self.eot], dtype=np.uint16))
        return np.concatenate(parts)


class BPETokenizer:
    """A byte-level BPE trained with ``tokenizers`` on the training documents, cached beside the tokens."""

    def __init__(self, vocab_size: int, path: Path, train_docs: Iterable[str] | None = None):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if path.exists():
            self.tok = Tokenizer.from_file(str(path))
        else:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train_from_iterator(train_docs, trainer=trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(path.name + ".part")  # a kill while saving leaves no half tokenizer to resume with
            tok.save(str(part))
            os.replace(part, path)
            self.tok = tok
        self.vocab_size = self.tok.get_vocab_size()
        if self.vocab_size > 65535:
            raise DataError(f"BPE vocabulary {self.vocab_size} does not fit the uint16 token cache")
        self.eot = self.tok.token_to_id(EOT)
        self.name = f"bpe{vocab_size}"

    def encode_docs(self, docs: list[str]) -> np.ndarray:
        parts = []
        for enc in self.tok.encode_batch(docs, add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [self.eot], dtype=np.uint16))
        return np.concatenate(parts)


def token_byte_lengths(tokenizer: str, tokenizer_path: Path, eot: int, vocab_size: int) -> np.ndarray:
    """Bytes per token id: 1 for every byte token, the byte-level string length of each BPE token, 0 for EOT."""
    lengths = np.ones(vocab_size, dtype=np.int64)
    if tokenizer != "bytes":
        from tokenizers import Tokenizer

        for piece, i in Tokenizer.from_file(str(tokenizer_path)).get_vocab().items():
            if i < vocab_size:
                lengths[i] = len(piece)  # ByteLevel: one alphabet character per byte
    lengths[eot] = 0
    return lengths


def tokenizer_id(cfg) -> str:
    if cfg.tokenizer == "bytes":
        return "bytes"
    if cfg.tokenizer == "bpe":
        if not 257 < cfg.bpe_vocab_size < 65536:
            raise DataError(f"data.bpe_vocab_size={cfg.bpe_vocab_size} must lie between 258 and 65535")
        return f"bpe{cfg.bpe_vocab_size}"
    raise DataError(f"data.tokenizer={cfg.tokenizer!r}: choose bytes or bpe")


# ----- the token cache -----------------------------------------------------------------------------------------

# Data settings that change the documents, the tokens or the train/held-out split, beyond the corpus's own content
# hash (which covers the files, hub name/subset/split and max_bytes) and the tokenizer: all are in the cache key.
TOKEN_SETTINGS = ("sample_by", "text_field", "val_fraction", "max_bytes", "split", "bpe_vocab_size", "bpe_sample_bytes")
# The keys that name a corpus's cache: what a `scaling-prepare` command line must repeat of a run's data settings.
CACHE_KEYS = ("path", "val_path", "name", "subset", "tokenizer", *TOKEN_SETTINGS, "cache_dir")


def token_settings(cfg) -> dict:
    """The values of ``TOKEN_SETTINGS``, less those of settings added later that sit at their baseline (the value
    that reproduces the tokens from before they existed, declared with the run identity in conf/train_schema.py) or
    do not act (``Key.when``): so every cache written before keeps its key and its ``meta.json``."""
    declared = RUN_IDENTITY["data"]
    return {k: cfg.get(k) for k in TOKEN_SETTINGS
            if declared[k].baseline is ALWAYS or (cfg.get(k) != declared[k].baseline
                                                  and (declared[k].when is None or declared[k].when(cfg)))}


def cache_key(cfg, info: dict, tok_id: str) -> str:
    """The token cache's folder name: corpus hash, tokenizer, and a hash of the ``token_settings``."""
    settings = json.dumps(token_settings(cfg), sort_keys=True, default=str).encode()
    return f"{info['corpus_hash'][:16]}-{tok_id}-{hashlib.sha256(settings).hexdigest()[:10]}"


def _locate(cfg) -> tuple[str, dict, Path]:
    tok_id = tokenizer_id(cfg)
    info = describe_corpus(cfg)
    return tok_id, info, Path(cfg.cache_dir) / "tokens" / cache_key(cfg, info, tok_id)


def prepare_corpus(cfg, verify_tokens: bool = True) -> Corpus:
    """A run's corpus: its token cache, prepared here on first use if the corpus is small; a larger one (over
    ``data.prepare_threshold_bytes``) or a hub dataset must have been prepared by ``scaling-prepare``. Later calls
    (from any process) read the cache. ``verify_tokens=False`` checks only ``meta.json`` against its checksum (a
    pre-launch check reads nothing else; the runs verify every file they read)."""
    tok_id, info, cache = _locate(cfg)
    if not (cache / "meta.json").exists():
        if cfg.source == "hub":
            _check_hub(cfg)  # a machine without a network cannot prepare it either
        size = None if cfg.source == "hub" else sum(f.stat().st_size for f in info["files"] + info["val_files"])
        if size is None or size > cfg.prepare_threshold_bytes:
            why = ("a hub dataset's size is unknown until it is streamed" if size is None else
                   f"its {size:,} bytes are over data.prepare_threshold_bytes={cfg.prepare_threshold_bytes:,}")
            raise DataError(f"corpus {info['corpus']!r} has no token cache yet and {why}: prepare it once with "
                            f"`{prepare_command(cfg)}` (a CPU job), then runs read it")
        build_cache(cfg, info, tok_id, cache)
    return _open_cache(cache, verify_tokens)


def prepare_cache(cfg, on_chunk: Callable[[dict], None] | None = None) -> Corpus:
    """``scaling-prepare``: the corpus's token cache, prepared in bounded memory whatever the corpus's size (or found
    prepared); ``on_chunk(progress)`` follows the tokenization."""
    tok_id, info, cache = _locate(cfg)
    if not (cache / "meta.json").exists():
        build_cache(cfg, info, tok_id, cache, on_chunk)
    return _open_cache(cache, verify_tokens=True)


def prepare_command(cfg) -> str:
    """The ``scaling-prepare`` command line for ``cfg``'s cache: its data preset and the cache's settings that differ
    from the preset's."""
    import shlex

    from omegaconf import OmegaConf

    from scaling_lab.conf.train_schema import DataConf

    preset = OmegaConf.merge(OmegaConf.structured(DataConf), OmegaConf.load(CONF_DIR / "data" / f"{cfg.source}.yaml"))
    preset = OmegaConf.to_container(preset, resolve=True, throw_on_missing=False)
    args = [f"data={cfg.source}"]
    for k in CACHE_KEYS:
        value = cfg.get(k)
        if value != preset.get(k):
            args.append(shlex.quote(f"data.{k}={'null' if value is None else value}"))
    return "scaling-prepare " + " ".join(args)


def build_cache(cfg, info: dict, tok_id: str, cache: Path, on_chunk: Callable[[dict], None] | None = None) -> None:
    """Stream, split, tokenize and write the corpus into ``cache`` (once, under a lock). The work goes into
    ``<cache>.tmp``, which a killed process leaves behind: the next one continues from its last finished chunk.
    The finished folder replaces nothing: it is renamed into place whole."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if (cache / "meta.json").exists():  # prepared by another process while this one waited
            return
        for orphan in cache.parent.glob(cache.name + ".tmp?*"):  # a per-process folder of an older release
            shutil.rmtree(orphan, ignore_errors=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.mkdir(exist_ok=True)
        if not sys.stderr.isatty():  # `datasets` progress bars are carriage-return noise in a log file
            import datasets

            datasets.disable_progress_bars()
        check_files(info)
        tok = ByteTokenizer() if tok_id == "bytes" else BPETokenizer(cfg.bpe_vocab_size, tmp / "tokenizer.json",
                                                                     bpe_sample(cfg, info))
        progress = _tokenize(cfg, info, tok, tmp, on_chunk)
        if not progress["train"]["documents"] or not progress["val"]["documents"]:
            raise DataError(f"corpus {info['corpus']!r} has {progress['train']['documents']} training and "
                            f"{progress['val']['documents']} held-out documents; it needs both (raise "
                            "data.val_fraction or give data.val_path)")
        meta = {k: v for k, v in info.items() if k not in ("files", "val_files")}
        meta.update(n_files=len(info["files"]) + len(info["val_files"]), tokenizer=tok_id, vocab_size=tok.vocab_size,
                    eot=tok.eot, settings=token_settings(cfg))
        for split in SPLITS:
            meta.update({f"{split}_{k}": progress[split][k] for k in ("tokens", "documents", "bytes")})
        np.save(tmp / "token_bytes.npy", token_byte_lengths(tok_id, tmp / "tokenizer.json", tok.eot, tok.vocab_size))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        files = sorted(f for f in tmp.iterdir() if f.name in CACHE_FILES)
        for f in files:
            integrity.write_checksum(f)
        for f in set(tmp.iterdir()) - set(files) - {integrity.sidecar(f) for f in files}:
            f.unlink()  # the progress record and any half-written temporary file
        os.replace(tmp, cache)


CACHE_FILES = {"train.bin", "val.bin", "meta.json", "tokenizer.json", "token_bytes.npy"}


def _tokenize(cfg, info: dict, tok, tmp: Path, on_chunk=None) -> dict:
    """Append the tokens of the corpus's documents to ``<split>.bin`` in ``tmp``, ``data.prepare_chunk_bytes`` of
    text at a time (``tokenizers`` encodes a chunk on every core), recording after each chunk how many documents
    were done and what was written (``progress.json``): a relaunch cuts off a chunk written only in part and skips
    the documents done. Returns the token, document and byte counts of each split."""
    record = tmp / "progress.json"
    progress = json.loads(record.read_text()) if record.exists() else \
        {"documents": 0, "done": False, **{s: {"tokens": 0, "documents": 0, "bytes": 0} for s in SPLITS}}
    for split in SPLITS:
        with open(tmp / f"{split}.bin", "ab") as f:
            f.truncate(progress[split]["tokens"] * np.dtype(np.uint16).itemsize)
    if progress["done"]:
        return progress
    for chunk in _chunks(itertools.islice(documents(cfg, info), progress["documents"], None), cfg.prepare_chunk_bytes):
        for split in SPLITS:
            docs = [text for s, text in chunk if s == split]
            if docs:
                ids = tok.encode_docs(docs)
                with open(tmp / f"{split}.bin", "ab") as f:
                    ids.tofile(f)
                counts = progress[split]
                counts["tokens"] += int(ids.size)
                counts["documents"] += len(docs)
                counts["bytes"] += sum(len(d.encode("utf-8", "replace")) for d in docs)
        progress["documents"] += len(chunk)
        write_json_atomic(record, progress)
        if on_chunk is not None:
            on_chunk(progress)
    progress["done"] = True
    write_json_atomic(record, progress)
    return progress


def _chunks(docs: Iterator[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    """Consecutive runs of documents of about ``size`` characters each."""
    chunk, n = [], 0
    for doc in docs:
        chunk.append(doc)
        n += len(doc[1])
        if n >= size:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _open_cache(cache: Path, verify_tokens: bool) -> Corpus:
    _verify_cache(cache, verify_tokens)  # no lock: a finished cache never changes, and readers need not queue
    return Corpus(cache, json.loads((cache / "meta.json").read_text()))


def _verify_cache(cache: Path, tokens: bool = True) -> None:
    """Every file of a token cache (or only its ``meta.json``) against its checksum: caches sit on shared
    filesystems, and a damaged token stream or ``meta.json`` would otherwise train and score a run silently on the
    wrong data. A cache written before checksums existed has none and is read unverified."""
    for f in sorted(cache.iterdir()):
        if not f.name.endswith(integrity.SUFFIX) and (tokens or f.name == "meta.json"):
            integrity.verify(f, f"delete the token cache {cache} (the next run tokenizes the corpus again)")


# ----- windows for Lightning -----------------------------------------------------------------------------------

class Windows(Dataset):
    """Windows of ``seq_len + 1`` tokens (inputs and shifted targets) at the given window indices."""

    def __init__(self, tokens: np.ndarray, seq_len: int, indices: np.ndarray):
        self.tokens, self.seq_len, self.indices = tokens, seq_len, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        start = int(self.indices[i]) * self.seq_len
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class GlobalBatches(Sampler):
    """Batches of window indices 0..n-1 in order, ``batch_size`` per optimizer step summed over all ranks (rank r
    takes every world-th window of each global batch), starting at batch ``start``; with ``accumulate`` > 1 each
    rank's share of a step comes in that many micro-batches (a shorter last batch in as many as it fills).

    Its length is the whole run's number of batches even when it starts later: Lightning counts the batches of a
    resumed epoch from where the checkpoint left off, so the run still ends exactly at the token budget.
    """

    def __init__(self, n: int, batch_size: int, start: int = 0, rank: int = 0, world: int = 1, on_batch=None,
                 accumulate: int = 1):
        self.n, self.batch_size, self.start, self.rank, self.world = n, batch_size, start, rank, world
        self.on_batch = on_batch  # called with each batch's indices as the loader takes it (in order)
        self.micro = max(1, batch_size // world // accumulate)  # sequences a rank takes at once

    def _share(self, b: int) -> list[int]:
        return list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))[self.rank::self.world]

    def __len__(self):
        steps = math.ceil(self.n / self.batch_size)  # every step's share is full but the last one's
        per_step, last = (math.ceil(len(self._share(b)) / self.micro) for b in (0, steps - 1))
        return (steps - 1) * per_step + last

    def __iter__(self):
        for b in range(self.start, math.ceil(self.n / self.batch_size)):
            share = self._share(b)
            for i in range(0, len(share), self.micro):
                if self.on_batch is not None:
                    self.on_batch(share[i:i + self.micro])
                yield share[i:i + self.micro]


def heldout_windows(n_tokens: int, seq_len: int, n: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """``n`` non-overlapping window indices spread over a held-out stream: the window slots (of ``seq_len`` tokens)
    are cut into ``n`` equal strata and one slot is drawn from each with a fixed seed, skipping ``exclude``d slots.
    So the slice covers the whole split (many documents, not the first few) and is the same for every run."""
    slots = unique_windows(n_tokens, seq_len)
    free = np.setdiff1d(np.arange(slots), exclude) if exclude is not None and len(exclude) else np.arange(slots)
    if n > len(free):
        raise DataError(f"{n} held-out windows of {seq_len} tokens requested, the held-out split has {len(free)}")
    edges = np.linspace(0, len(free), n + 1).astype(np.int64)
    rng = np.random.default_rng(seed)
    return free[edges[:-1] + (rng.random(n) * (edges[1:] - edges[:-1])).astype(np.int64)]


def slice_info(corpus: Corpus, windows: np.ndarray, seq_len: int) -> dict:
    """What an evaluation slice covers: windows, target tokens, their UTF-8 bytes, and documents touched."""
    tokens = corpus.tokens("val")
    starts = np.asarray(windows, dtype=np.int64) * seq_len
    targets = np.concatenate([np.asarray(tokens[s + 1:s + seq_len + 1]) for s in starts]) if len(starts) else \
        np.zeros(0, dtype=np.uint16)
    eots = np.flatnonzero(np.asarray(tokens) == corpus.meta["eot"])
    first = np.searchsorted(eots, starts + 1, side="left")  # document index = end-of-text tokens before the token
    last = np.searchsorted(eots, starts + seq_len, side="left")
    docs = set()
    for a, b in zip(first, last):
        docs.update(range(int(a), int(b) + 1))
    return {"windows": int(len(windows)), "tokens": int(targets.size),
            "bytes": int(corpus.token_bytes[targets.astype(np.int64)].sum()),
            "documents": len(docs), "documents_total": int(corpus.meta.get("val_documents") or len(eots)),
            "span": [int(starts.min()), int(starts.max() + seq_len)] if len(starts) else [0, 0],
            "split_tokens": int(len(tokens))}


def unique_windows(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping training windows in a token stream (each needs one extra token for its last target)."""
    return max(0, (n_tokens - 1) // seq_len)


def check_budget(corpus: Corpus, tokens: int, seq_len: int) -> int:
    """The corpus's number of distinct training windows; a budget needing more is an error (no epoch repeats)."""
    available = unique_windows(corpus.meta["train_tokens"], seq_len)
    if tokens > available * seq_len:
        raise DataError(f"token budget {tokens:,} exceeds the {available * seq_len:,} unique training tokens of "
                        f"corpus {corpus.meta['corpus']!r} at seq_len={seq_len}; lower train.tokens or use a larger "
                        "corpus (runs never repeat data)")
    return available


@dataclass(frozen=True)
class DataSettings:
    """What a ``TokenDataModule`` serves: ``train_sequences`` training windows of ``seq_len`` tokens in the order
    ``seed`` gives, in batches of ``batch_size`` sequences per optimizer step (each rank's share in ``accumulate``
    micro-batches); held-out slices of ``eval_tokens`` (the final loss) and ``val_curve_tokens`` (the validation
    curve), both drawn with ``eval_seed``; ``num_workers`` loader processes."""

    seq_len: int
    batch_size: int
    train_sequences: int
    eval_tokens: int
    val_curve_tokens: int
    seed: int
    num_workers: int = 0
    eval_seed: int = 0
    accumulate: int = 1


class TokenDataModule(L.LightningDataModule):
    """Serves exactly ``train_sequences`` distinct training windows, in a seeded order, starting after the windows
    that earlier (interrupted) attempts of the same run already consumed; and a fixed held-out slice."""

    def __init__(self, corpus: Corpus, settings: DataSettings):
        super().__init__()
        s = self.settings = settings
        self.corpus, self.seq_len, self.batch_size, self.accumulate = corpus, s.seq_len, s.batch_size, s.accumulate
        self.train_sequences, self.seed, self.num_workers = s.train_sequences, s.seed, s.num_workers
        seq_len = s.seq_len
        available = check_budget(corpus, s.train_sequences * seq_len, seq_len)
        n_eval = s.eval_tokens // seq_len
        if n_eval < 1 or n_eval > unique_windows(corpus.meta["val_tokens"], seq_len):
            raise DataError(f"data.eval_tokens={s.eval_tokens:,} needs between {seq_len} and "
                            f"{unique_windows(corpus.meta['val_tokens'], seq_len) * seq_len:,} held-out tokens")
        n_val = corpus.meta["val_tokens"]
        self.eval_windows = heldout_windows(n_val, seq_len, n_eval, s.eval_seed)
        n_curve = max(1, min(unique_windows(n_val, seq_len) - n_eval, s.val_curve_tokens // seq_len))
        self.val_curve_windows = heldout_windows(n_val, seq_len, n_curve, s.eval_seed + 1, exclude=self.eval_windows) \
            if n_curve else self.eval_windows[:1]
        order = np.random.default_rng(s.seed).permutation(available)
        self.train_windows = order[:s.train_sequences]
        self.fed: collections.deque = collections.deque()  # window indices of batches taken, not yet trained on

    def train_dataloader(self):
        # A run resumed from a checkpoint continues with the batches it has not seen yet (one batch per step).
        trainer = self.trainer
        start, rank, world = (trainer.global_step, trainer.global_rank, trainer.world_size) if trainer else (0, 0, 1)
        self.fed.clear()
        if world > 1 and (self.batch_size % world or len(self.train_windows) % world):
            raise DataError(f"{world} ranks cannot split batches of {self.batch_size} and {len(self.train_windows)} "
                            "sequences evenly: give train.devices and train.num_nodes as counts, so the run's plan "
                            "rounds the budget for its ranks")
        sampler = GlobalBatches(len(self.train_windows), self.batch_size, start, rank, world,
                                on_batch=lambda b: self.fed.append(self.train_windows[b]), accumulate=self.accumulate)
        ds = Windows(self.corpus.tokens("train"), self.seq_len, self.train_windows)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers, pin_memory=self._pin())

    def val_dataloader(self):
        return self._heldout(self.val_curve_windows)

    def eval_dataloader(self):
        return self._heldout(self.eval_windows)

    def _heldout(self, windows):
        ds = Windows(self.corpus.tokens("val"), self.seq_len, windows)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self._pin())

    def _pin(self) -> bool:
        """Page-locked batches (a faster, asynchronous copy to the device) when the trainer trains on CUDA."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"


def bits_per_byte(nats_total: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte of a slice whose summed loss is ``nats_total``: the slice's own bytes, not an average."""
    return nats_total / n_bytes / math.log(2)
