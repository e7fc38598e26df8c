"""Corpora loaded with `datasets`: the stdlib default, the user's own files (the shared English prose corpus, JSONL),
the BPE tokenizer, the token cache, and windows that never repeat."""

import json
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

from scaling_lab.conf.train_schema import DataConf
from scaling_lab.pipeline.data import DataError, TokenDataModule, prepare_corpus, stdlib_files
from tests.helpers import shared_path


def data_cfg(cache, **kw):
    return OmegaConf.structured(DataConf(cache_dir=str(cache), **kw))


def test_stdlib_corpus_is_the_running_interpreters_source(token_cache):
    corpus = prepare_corpus(data_cfg(token_cache))
    meta = corpus.meta
    assert meta["source"] == "stdlib" and meta["n_files"] == len(stdlib_files()) > 500
    assert meta["train_tokens"] > 10_000_000 and meta["val_tokens"] > 100_000
    train = corpus.tokens("train")
    assert train.dtype == np.uint16 and train.max() <= 256 and len(train) == meta["train_tokens"]
    text = bytes(train[:2000][train[:2000] < 256].astype(np.uint8)).decode("utf-8", "replace")
    assert "def " in text or "import " in text or '"""' in text
    start = time.time()
    assert prepare_corpus(data_cfg(token_cache)).dir == corpus.dir  # cached: found again, not rebuilt
    assert time.time() - start < 2


def test_user_files_gutenberg_with_its_validation_file(tmp_path):
    root = shared_path("corpus", "gutenberg_en")
    cfg = data_cfg(tmp_path, source="files", path=str(root / "train_000.txt"), val_path=str(root / "valid_000.txt"),
                   sample_by="paragraph")
    corpus = prepare_corpus(cfg)
    assert corpus.meta["train_bytes"] > 3_000_000 and corpus.meta["val_bytes"] > 2_500_000
    val = bytes(corpus.tokens("val")[:5000][corpus.tokens("val")[:5000] < 256].astype(np.uint8)).decode("utf-8", "replace")
    assert " the " in val


def test_jsonl_files_and_a_missing_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": f"document {i}: " + "lorem ipsum dolor sit amet " * 20} for i in range(400)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = prepare_corpus(data_cfg(tmp_path / "c", source="files", path=str(path), text_field="body",
                                     val_fraction=0.1))
    assert corpus.meta["train_documents"] + corpus.meta["val_documents"] == 400
    assert 10 < corpus.meta["val_documents"] < 80
    with pytest.raises(DataError, match="no column 'text'"):
        prepare_corpus(data_cfg(tmp_path / "d", source="files", path=str(path)))


def test_bpe_tokenizer_is_trained_cached_and_compresses(tmp_path):
    cfg = data_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=512, max_bytes=400_000)
    corpus = prepare_corpus(cfg)
    assert corpus.vocab_size == 512 and (corpus.dir / "tokenizer.json").exists()
    assert 1.5 < corpus.bytes_per_token < 4  # bytes per token: BPE merges, bytes would be 1.0
    assert corpus.dir.name.endswith("bpe512-v20000")


def test_hub_without_network_is_a_clear_error(tmp_path, monkeypatch):
    # an endpoint nothing listens on: the same refusal a machine without a network gets, whatever this one has
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.time()
    with pytest.raises(DataError, match="cannot be reached"):
        prepare_corpus(data_cfg(tmp_path, source="hub", name="HuggingFaceFW/fineweb-edu"))
    assert time.time() - start < 15


def test_training_windows_are_distinct_and_exactly_the_budget(token_cache):
    corpus = prepare_corpus(data_cfg(token_cache))
    dm = TokenDataModule(corpus, seq_len=64, batch_size=7, train_sequences=100, eval_tokens=640,
                         val_curve_tokens=128, seed=3)
    assert len(set(dm.train_windows.tolist())) == 100
    batches = list(dm.train_dataloader())
    assert sum(x.numel() for x, _ in batches) == 100 * 64
    x, y = batches[0]
    assert x.shape == (7, 64) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    assert len(dm.eval_dataloader().dataset) == 10
    other = TokenDataModule(corpus, 64, 7, 100, 640, 128, seed=4)
    assert not np.array_equal(other.train_windows, dm.train_windows)  # the seed orders the data
