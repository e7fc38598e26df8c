"""``scaling-export`` checked against an independent implementation, Hugging Face ``transformers``: tiny runs trained
by the real trainer (weights saved as safetensors) are exported as GPT-2 folders and loaded with
``AutoModelForCausalLM`` / ``AutoTokenizer``; their logits, greedy generation, assisted generation (against our
speculative decoding, same draft and target) and held-out loss equal ours, their tokenizers give the ids the runs
were trained on, and a folder read back gives identical logits. Fast tests: the conversion of tied and untied heads
on untrained models, the weights file format, and bad input in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from omegaconf import OmegaConf
from transformers.convert_slow_tokenizer import bytes_to_unicode

from scaling_lab.conf import UserError, compose
from scaling_lab.fit.io import integrity
from scaling_lab.models import hf
from scaling_lab.models.gpt import GPT
from scaling_lab.models.shapes import GPTConfig
from scaling_lab.models.speculative import speculative_generate
from scaling_lab.pipeline import export, serving, weights
from scaling_lab.pipeline.data import BPETokenizer, ByteTokenizer, prepare_corpus
from scaling_lab.pipeline.train import run as train
from tests.helpers import TINY

SWEEP = "serve"  # the sweep of the shared tiny runs (tests/conftest.py)
BIN = Path(sys.executable).parent
TEXT = Path(json.__file__).read_text()[:3000]  # stdlib source, the corpus the runs were trained on


@pytest.fixture(scope="module")
def runs(tiny_runs):
    """The shared tiny runs that kept their weights (tests/conftest.py): a target, a draft, a 300-token BPE run."""
    results, records = tiny_runs
    return results, {name: r for name, r in records.items() if r.get("weights")}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Each run exported by the command's own function, into a folder of its name."""
    results, records = runs
    folder = tmp_path_factory.mktemp("hf")
    for name, record in records.items():
        export.run(compose("export", [f"results_dir={results}", f"sweep={SWEEP}", f"run={record['run_id']}",
                                      f"out={folder / name}"]))
    return folder


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def prompts(record: dict, n: int, length: int) -> torch.Tensor:
    _, windows = serving.eval_windows(record)
    return torch.stack([windows[i * 7][0][:length] for i in range(n)])


@pytest.mark.slow
def test_a_run_saves_safetensors_and_its_export_loads_with_the_auto_classes(runs, exported):
    results, records = runs
    for name, record in records.items():
        assert record["weights"] == {"path": f"weights/{record['run_id']}.safetensors", "format": "safetensors",
                                     "bytes": serving.weights_file(record, results).stat().st_size}
        assert integrity.problem(serving.weights_file(record, results)) is None
        folder = exported / name
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
        model = hf_model(folder)
        assert type(model).__name__ == "GPT2LMHeadModel"
        s = record["shape"]
        c = model.config
        assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.n_positions, c.n_inner) == (
            s["n_layers"], s["d_model"], s["n_heads"], s["vocab_size"], s["seq_len"], s["ffn_hidden"])
        assert c.activation_function == "gelu" and c.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied as ours


@pytest.mark.slow
def test_the_exported_tokenizer_gives_the_ids_the_run_trained_on(runs, exported):
    _, records = runs
    for name, ours in {"target": ByteTokenizer(), "bpe": None}.items():
        record = records[name]
        if ours is None:  # the BPE the pipeline trained, read from the run's token cache
            corpus = prepare_corpus(OmegaConf.create(record["config"]["data"]), verify_tokens=False)
            ours = BPETokenizer(0, corpus.dir / "tokenizer.json")
        tok = transformers.AutoTokenizer.from_pretrained(exported / name)
        ids = tok.encode(TEXT)
        assert ids == ours.encode_docs([TEXT]).tolist()[:-1]  # ours ends each document with end-of-text
        assert tok.decode(ids) == TEXT
        assert tok.eos_token_id == ours.eot == hf_model(exported / name).generation_config.eos_token_id


@pytest.mark.slow
def test_logits_and_held_out_loss_through_transformers_equal_ours(runs, exported):
    results, records = runs
    for name, record in records.items():
        ours, theirs = serving.load_model(record, results), hf_model(exported / name)
        _, windows = serving.eval_windows(record)
        loader = torch.utils.data.DataLoader(windows, batch_size=32, shuffle=False)
        total, count = 0.0, 0
        with torch.inference_mode():
            for x, y in loader:
                logits = theirs(x).logits
                torch.testing.assert_close(logits, ours(x), atol=1e-5, rtol=0)
                total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
                count += y.numel()
        assert count == record["loss"]["eval"]["tokens"]
        assert total / count == pytest.approx(record["loss"]["final"], abs=1e-5)


@pytest.mark.slow
def test_greedy_generation_is_token_identical(runs, exported):
    results, records = runs
    for name in ("target", "bpe"):
        ours, theirs = serving.load_model(records[name], results), hf_model(exported / name)
        prompt = prompts(records[name], 4, 6)
        with torch.inference_mode():
            expected = ours.generate(prompt, 20)
            got = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=20, eos_token_id=None)  # ours decodes 20 tokens, end-of-text or not
        assert torch.equal(got, expected)


@pytest.mark.slow
def test_our_speculative_decoding_equals_transformers_assisted_generation(runs, exported):
    results, records = runs
    target, draft = (serving.load_model(records[n], results) for n in ("target", "draft"))
    hf_target, hf_draft = hf_model(exported / "target"), hf_model(exported / "draft")
    accepted = drafted = 0
    for prompt in prompts(records["target"], 3, 6):
        prompt = prompt[None]
        with torch.inference_mode():
            assisted = hf_target.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=hf_draft,
                                          do_sample=False, max_new_tokens=20, eos_token_id=None)
        for k in (1, 3):
            ours, stats = speculative_generate(target, draft, prompt, 20, k)
            assert torch.equal(ours, assisted) and stats.emitted == 20
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
        assert torch.equal(assisted, target.generate(prompt, 20))
    assert 0 < accepted < drafted  # the draft was both accepted and rejected: both paths of the rule ran


@pytest.mark.slow
def test_an_exported_folder_reads_back_to_identical_logits(runs, exported, capsys):
    results, records = runs
    record = records["target"]
    ours = serving.load_model(record, results)
    back = export.read_folder(exported / "target")
    assert back.config == ours.config
    x = prompts(record, 4, record["shape"]["seq_len"])
    with torch.inference_mode():
        assert torch.equal(back(x), ours(x))
    doc = export.run(compose("export", [f"results_dir={results}", f"sweep={SWEEP}", f"run={record['run_id']}",
                                        f"import_from={exported / 'target'}"]))
    assert doc["max_abs_logit_diff"] == 0.0 and "(identical)" in capsys.readouterr().out
    with pytest.raises(UserError, match="has shape"):  # the draft's folder is not the target's model
        export.run(compose("export", [f"results_dir={results}", f"sweep={SWEEP}", f"run={record['run_id']}",
                                      f"import_from={exported / 'draft'}"]))


@pytest.mark.slow
def test_export_refuses_an_unknown_run_and_a_used_folder_in_one_line(runs, exported, tmp_path):
    results, records = runs
    out = subprocess.run([str(BIN / "scaling-export"), f"results_dir={results}", f"sweep={SWEEP}",
                          "run=0123456789ab", f"out={tmp_path / 'a'}"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("scaling-export: error: "), out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and "unknown run id(s) ['0123456789ab']" in out.stderr
    assert not (tmp_path / "a").exists()
    used = [f"results_dir={results}", f"sweep={SWEEP}", f"run={records['target']['run_id']}"]
    before = sorted(p.name for p in (exported / "draft").iterdir())
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        export.run(compose("export", [*used, f"out={exported / 'draft'}"]))
    assert sorted(p.name for p in (exported / "draft").iterdir()) == before
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    export.run(compose("export", [*used, f"out={tmp_path / 'empty'}"]))
    assert (tmp_path / "empty" / "model.safetensors").is_file()


# ----- fast: the conversion, the weights file, bad input -------------------------------------------------------

def _random_gpt(tie: bool, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=257, seq_len=16, ffn_ratio=3.0,
                         tie_embeddings=tie)).eval()


def _write(model: GPT, folder: Path) -> Path:
    config, state = hf.to_hf(model, ByteTokenizer.eot)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights.save(state, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("tie", [True, False])
def test_conversion_of_tied_and_untied_heads_matches_transformers(tie, tmp_path):
    """Untrained weights (every value random, so a transposed or misplaced matrix shows) with an MLP of 3 d_model."""
    ours = _random_gpt(tie)
    theirs = hf_model(_write(ours, tmp_path / "hf"))
    assert theirs.config.tie_word_embeddings is tie
    x = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=1e-5, rtol=0)
        back = hf.from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()),
                          {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items()})
        assert torch.equal(back(x), ours(x))
    assert (back.head.weight is back.wte.weight) is tie


def test_the_byte_alphabet_is_gpt2s():
    assert export.byte_alphabet() == bytes_to_unicode()


def test_weights_round_trip_retie_and_refuse_what_is_not_safetensors(tmp_path):
    model = _random_gpt(True)
    path = weights.save(model.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "plain").write_text("")  # as readable as any file written here (safetensors alone writes 0600)
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    state = weights.load(path, "remedy")
    assert set(state) == set(model.state_dict()) and state["head.weight"] is state["wte.weight"]
    copy = GPT(model.config)
    copy.load_state_dict(state)
    assert copy.head.weight is copy.wte.weight and torch.equal(copy.wte.weight, model.wte.weight)

    torch.save(model.state_dict(), tmp_path / "w.pt")  # the previous format still loads, data only
    assert torch.equal(weights.load(tmp_path / "w.pt", "remedy")["wte.weight"], model.wte.weight)

    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(integrity.IntegrityError, match="is not a safetensors file") as err:
        weights.load(tmp_path / "bad.safetensors", "delete it")
    assert "\n" not in str(err.value) and str(err.value).endswith("; delete it")


def test_bad_gpt2_folders_are_refused_in_one_line(tmp_path):
    good = _write(_random_gpt(True), tmp_path / "good")
    cases = {}

    def variant(name: str, edit_config=None, edit_state=None) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        if edit_state:
            state = weights.load(folder / "model.safetensors", "")
            edit_state(state)
            weights.save(state, folder / "model.safetensors")
        return folder

    cases[variant("tanh", lambda c: c.update(activation_function="gelu_new"))] = "activation_function='gelu_new'"
    cases[variant("default_act", lambda c: c.pop("activation_function"))] = "activation_function='gelu_new'"
    cases[variant("llama", lambda c: c.update(model_type="llama"))] = "only GPT-2"
    cases[variant("eps", lambda c: c.update(layer_norm_epsilon=1e-6))] = "layer_norm_epsilon=1e-06"
    cases[variant("wide", lambda c: c.update(n_embd=64))] = "has shape (257, 32), config.json's shape needs (257, 64)"
    cases[variant("bias", edit_state=lambda s: s["transformer.h.0.mlp.c_fc.bias"].fill_(0.5))] = "is not zero"
    cases[variant("missing", edit_state=lambda s: s.pop("transformer.h.1.ln_2.weight"))] = "no 'transformer.h.1.ln_2"
    pickled = variant("pickled")
    torch.save({"a": torch.zeros(2)}, pickled / "model.safetensors")
    integrity.write_checksum(pickled / "model.safetensors")
    cases[pickled] = "is not a safetensors file"
    cases[tmp_path / "nowhere"] = "is not a folder"
    (tmp_path / "no_weights").mkdir()
    cases[tmp_path / "no_weights"] = "has no config.json"
    for folder, expected in cases.items():
        with pytest.raises(UserError) as err:
            export.run(compose("export", [f"import_from={folder}"]))
        assert expected in str(err.value) and "\n" not in str(err.value), (folder.name, str(err.value))


def test_the_command_needs_a_run_and_answers_help(tmp_path):
    with pytest.raises(UserError, match="give sweep=<name> and run=<run id>"):
        export.run(compose("export", []))
    with pytest.raises(UserError, match="no results for sweep 'nothing_here'"):
        export.run(compose("export", [f"results_dir={tmp_path}", "sweep=nothing_here", "run=abc"]))
    with pytest.raises(UserError, match="run= needs sweep="):
        export.run(compose("export", [f"import_from={tmp_path}", "run=abc"]))
    helped = subprocess.run([str(BIN / "scaling-export"), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("scaling-export:") and "Example" in helped.stdout
