"""``scaling-export``: a trained run as a Hugging Face GPT-2 folder that ``transformers`` loads as it is, and such a
folder read back into our GPT.

Export, ``scaling-export sweep=<name> run=<run id> [out=<folder>]``: an ``ok`` run with saved weights
(``train.save_model=true``) is written into ``out`` (default ``<results_dir>/hf/<sweep>/<run id>``; an existing
folder must be empty), built beside it and renamed into place whole:

    config.json              ``GPT2Config`` of the run's shape (``models/hf.py``: the mapping, and why it is exact)
    model.safetensors        the weights under GPT-2's names (Conv1D transposed, zero biases, a tied head stored once),
                             with its checksum ``model.safetensors.sha256`` (``pipeline.weights``)
    generation_config.json   the end-of-text token as bos, eos and pad
    tokenizer.json           the run's tokenizer for ``tokenizers``: the BPE the pipeline trained (its token cache's
                             file), or, for the byte tokenizer, a byte-level BPE with no merges whose ids are the UTF-8
                             bytes and ``<|endoftext|>`` 256
    tokenizer_config.json    ``PreTrainedTokenizerFast``, ``<|endoftext|>`` as bos and eos, the context as
                             ``model_max_length``

``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` then load it; the
tokenizer encodes text (without the literal string ``<|endoftext|>``, which it reads as the special token) to the
ids the run was trained on. Nothing here imports ``transformers``: the export needs the ``[train]`` extra only.

Import, ``scaling-export import_from=<folder>``: a GPT-2 folder (``config.json`` and one ``model.safetensors``)
read into our GPT, every setting and shape checked (``models.hf.from_hf``); with ``sweep=`` and ``run=``, its
logits on that run's first held-out windows are compared with the run's own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from scaling_lab.conf import UserError
from scaling_lab.fit.io import integrity
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.models import hf
from scaling_lab.models.gpt import GPT
from scaling_lab.pipeline import serving, weights
from scaling_lab.pipeline.data import EOT, ByteTokenizer, prepare_corpus

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class ExportError(UserError):
    """Bad input for ``scaling-export`` (no run given, an output folder in the way, a folder that is not GPT-2)."""


def run(cfg: DictConfig) -> dict:
    if cfg.import_from:
        return import_folder(cfg)
    if not cfg.sweep or not cfg.run:
        raise ExportError("give sweep=<name> and run=<run id> to export (or import_from=<folder> to read one back)")
    out = Path(cfg.out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ExportError(f"out={out} exists and is not an empty folder: choose another out= or remove it")
    (record,) = serving.pick_records(serving.ok_records(cfg.results_dir, cfg.sweep), [str(cfg.run)],
                                     cfg.results_dir, cfg.sweep)
    model = serving.load_model(record, cfg.results_dir)
    export(model, record, out)
    print(f"exported run {record['run_id']} ({describe(model)}) as GPT-2 to {out}: "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return {"run_id": record["run_id"], "out": str(out), "files": sorted(p.name for p in out.iterdir())}


def describe(model: GPT) -> str:
    c = model.config
    return (f"{c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, vocabulary {c.vocab_size}, context "
            f"{c.seq_len}, {'tied' if c.tie_embeddings else 'untied'} head")


def export(model: GPT, record: dict, out: Path) -> Path:
    """Write ``model`` (the run ``record``'s) and the run's tokenizer as a GPT-2 folder ``out`` (see the module
    docstring), built in a temporary folder beside it and renamed into place."""
    tokenizer, eot = run_tokenizer(record)
    config, state = hf.to_hf(model, eot)
    seq_len = model.config.seq_len
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_json_atomic(tmp / CONFIG, config)
        weights.save(state, tmp / WEIGHTS)
        write_json_atomic(tmp / "generation_config.json",
                          {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json_atomic(tmp / "tokenizer_config.json",
                          {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
                           "model_max_length": seq_len, "clean_up_tokenization_spaces": False})
        os.replace(tmp, out)  # an empty ``out`` is replaced; a non-empty one was refused before any work
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run_tokenizer(record: dict):
    """The run's tokenizer as a ``tokenizers.Tokenizer``, and its end-of-text id."""
    kind = record["data"]["tokenizer"]
    if kind == "bytes":
        return byte_tokenizer(), ByteTokenizer.eot
    corpus = prepare_corpus(OmegaConf.create(record["config"]["data"]), verify_tokens=False)
    if corpus.meta["tokenizer"] != kind or corpus.vocab_size != record["shape"]["vocab_size"]:
        raise ExportError(f"the token cache {corpus.dir} holds tokenizer {corpus.meta['tokenizer']} of "
                          f"{corpus.vocab_size} tokens, the run {record['run_id']} {kind} of "
                          f"{record['shape']['vocab_size']}")
    path = corpus.dir / "tokenizer.json"
    integrity.verify(path, f"delete the token cache {corpus.dir} (the next run tokenizes the corpus again)")
    return Tokenizer.from_file(str(path)), int(corpus.meta["eot"])


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet (what ``tokenizers``' ByteLevel pre-tokenizer writes each byte as): printable
    Latin-1 bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    spare = iter(range(256, 512))
    return {b: chr(b if b in printable else next(spare)) for b in range(256)}


def byte_tokenizer():
    """``pipeline.data.ByteTokenizer`` for ``tokenizers``: byte-level BPE with no merges (each byte a token, its id
    the byte), ``<|endoftext|>`` its end-of-text id."""
    vocab = {char: b for b, char in byte_alphabet().items()}
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    if tok.token_to_id(EOT) != ByteTokenizer.eot or tok.get_vocab_size() != ByteTokenizer.vocab_size:
        raise RuntimeError(f"the byte tokenizer's {EOT} got id {tok.token_to_id(EOT)}, not {ByteTokenizer.eot}")
    return tok


def read_folder(folder: Path) -> GPT:
    """Our GPT from a GPT-2 folder (``config.json``, ``model.safetensors``), checked; bad input in one line."""
    if not folder.is_dir():
        raise ExportError(f"import_from={folder} is not a folder")
    if (folder / f"{WEIGHTS}.index.json").exists():
        raise ExportError(f"{folder} holds sharded weights ({WEIGHTS}.index.json): only one {WEIGHTS} is read")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise ExportError(f"{folder} has no {name}: not a Hugging Face model folder in safetensors")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{folder / CONFIG} is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{folder / CONFIG} is not a JSON object")
    hf.hf_shape(config)  # the settings, before the weights are read
    state = weights.load(folder / WEIGHTS, "export the run again into an empty folder")
    return hf.from_hf(config, state)


@torch.inference_mode()
def import_folder(cfg: DictConfig) -> dict:
    """``import_from``: the folder read into our GPT; with ``sweep`` and ``run``, its logits compared with that
    run's on the first held-out windows (at most 8)."""
    folder = Path(cfg.import_from)
    run_id = str(cfg.run) if cfg.run else None
    record = None
    if run_id:
        if not cfg.sweep:
            raise ExportError("run= needs sweep= (the run whose logits the imported model's are compared with)")
        (record,) = serving.pick_records(serving.ok_records(cfg.results_dir, cfg.sweep), [run_id], cfg.results_dir,
                                         cfg.sweep)
    model = read_folder(folder)
    doc = {"import_from": str(folder), "shape": describe(model)}
    print(f"{folder}: GPT-2 read into our GPT ({describe(model)})")
    if record is not None:
        ours = serving.load_model(record, cfg.results_dir)
        if ours.config != model.config:
            raise ExportError(f"{folder} has shape {model.config}, run {run_id} {ours.config}")
        _, windows = serving.eval_windows(record)
        x = torch.stack([windows[i][0] for i in range(min(8, len(windows)))])
        diff = float((model(x) - ours(x)).abs().max())
        doc.update(run_id=run_id, max_abs_logit_diff=diff)
        print(f"logits on {len(x)} held-out windows of run {run_id}: max |difference| {diff:.3g}"
              + (" (identical)" if diff == 0 else ""))
    return doc
