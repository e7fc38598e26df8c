"""Corpora loaded with `datasets`: the stdlib default, the user's own files (the shared English prose corpus, JSONL),
the BPE tokenizer, the token cache, and windows that never repeat."""

import json
import time
from dataclasses import replace

import numpy as np
import pytest
from omegaconf import OmegaConf

from scaling_lab.conf.train_schema import DataConf
from scaling_lab.pipeline.data import (DataError, DataSettings, TokenDataModule, heldout_windows, prepare_corpus,
                                       slice_info, stdlib_files)
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
    assert "-bpe512-" in corpus.dir.name
    lengths = corpus.token_bytes
    assert lengths[corpus.meta["eot"]] == 0 and lengths.max() > 1  # merged tokens stand for several bytes


def test_hub_without_network_is_a_clear_error(tmp_path, monkeypatch):
    # an endpoint nothing listens on: the same refusal a machine without a network gets, whatever this one has
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.time()
    with pytest.raises(DataError, match="cannot be reached"):
        prepare_corpus(data_cfg(tmp_path, source="hub", name="HuggingFaceFW/fineweb-edu"))
    assert time.time() - start < 15


def test_training_windows_are_distinct_and_exactly_the_budget(token_cache):
    corpus = prepare_corpus(data_cfg(token_cache))
    dm = TokenDataModule(corpus, DataSettings(seq_len=64, batch_size=7, train_sequences=100, eval_tokens=640,
                                              val_curve_tokens=128, seed=3))
    assert len(set(dm.train_windows.tolist())) == 100
    batches = list(dm.train_dataloader())
    assert sum(x.numel() for x, _ in batches) == 100 * 64
    x, y = batches[0]
    assert x.shape == (7, 64) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    assert len(dm.eval_dataloader().dataset) == 10
    other = TokenDataModule(corpus, replace(dm.settings, seed=4))
    assert not np.array_equal(other.train_windows, dm.train_windows)  # the seed orders the data


def test_eval_slice_is_spread_over_the_split_and_the_same_for_every_run(token_cache):
    corpus = prepare_corpus(data_cfg(token_cache))
    kw = dict(seq_len=64, batch_size=8, train_sequences=50, eval_tokens=64 * 256, val_curve_tokens=64 * 32)
    a = TokenDataModule(corpus, DataSettings(seed=0, **kw))
    b = TokenDataModule(corpus, DataSettings(seed=7, **kw))  # another run (another training seed): the same held-out tokens
    assert np.array_equal(a.eval_windows, b.eval_windows) and len(a.eval_windows) == 256
    assert not np.array_equal(a.eval_windows, np.arange(256))  # not the first-K slice
    assert not set(a.eval_windows) & set(a.val_curve_windows)  # the validation curve has its own windows
    spread, first = slice_info(corpus, a.eval_windows, 64), slice_info(corpus, np.arange(256), 64)
    assert spread["tokens"] == first["tokens"] == 256 * 64
    assert spread["documents"] > 5 * first["documents"] and spread["documents"] > 0.7 * spread["documents_total"]
    assert spread["span"][1] > 0.95 * corpus.meta["val_tokens"]  # reaches the end of the split
    eot = corpus.meta["eot"]
    targets = np.concatenate([corpus.tokens("val")[w * 64 + 1:w * 64 + 65] for w in a.eval_windows])
    assert spread["bytes"] == int((targets != eot).sum())  # bytes: exactly the evaluated targets (byte tokenizer)
    with pytest.raises(DataError, match="held-out windows"):
        heldout_windows(640, 64, 20, seed=0)


def test_cache_key_covers_every_setting_that_changes_tokens(tmp_path):
    corpus_dir = tmp_path / "docs"
    corpus_dir.mkdir()
    for i in range(30):
        (corpus_dir / f"f{i}.txt").write_text(f"paragraph one of {i}\n\nparagraph two of {i} " * 5)
    base = prepare_corpus(data_cfg(tmp_path / "c", source="files", path=str(corpus_dir), val_fraction=0.2))
    by_para = prepare_corpus(data_cfg(tmp_path / "c", source="files", path=str(corpus_dir), val_fraction=0.2,
                                      sample_by="paragraph"))
    assert by_para.dir != base.dir and by_para.meta["train_documents"] > base.meta["train_documents"]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"a": f"alpha {i} " * 30, "b": f"beta {i} " * 30}) for i in range(50)))
    a = prepare_corpus(data_cfg(tmp_path / "c", source="files", path=str(path), text_field="a", val_fraction=0.2))
    b = prepare_corpus(data_cfg(tmp_path / "c", source="files", path=str(path), text_field="b", val_fraction=0.2))
    assert a.dir != b.dir and a.meta["settings"]["text_field"] == "a"
    assert bytes(b.tokens("train")[:4].astype(np.uint8)) == b"beta"
