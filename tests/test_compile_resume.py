"""``train.compile`` changes how a run computes, never what it saves: a LitGPT's state dict is the model's, once, with
compile on or off; a checkpoint in the older layout (the forward's module a second time) still loads; and a real
run pre-empted with compile on resumes with it off, and the reverse, with real inductor compilation on the CPU:
exactly its token budget and windows, two attempts, and an uninterrupted run's held-out loss up to the compiled
kernels' rounding."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from scaling_lab.conf import compose
from scaling_lab.models.shapes import GPTConfig
from scaling_lab.pipeline.module import LitGPT
from scaling_lab.pipeline.train import run
from tests.helpers import TINY
from tests.test_faults import TRAIN_PHASE, _popen, _wait_for_line


def _module(compile: bool) -> LitGPT:
    torch.manual_seed(0)
    return LitGPT(GPTConfig(n_layers=1, d_model=32, n_heads=2), lr=1e-3, total_steps=10, warmup_steps=1,
                  min_lr_ratio=0.1, weight_decay=0.0, betas=(0.9, 0.95), diverge_loss=10.0, check_every=1,
                  compile=compile)


def test_the_state_dict_is_the_model_once_with_compile_on_or_off():
    eager, compiled = _module(False), _module(True)
    keys = list(eager.state_dict())
    assert keys == [f"model.{k}" for k in eager.model.state_dict()]  # no second copy under another name
    assert list(compiled.state_dict()) == keys
    # every parameter once (the tied embedding and head: one tensor, under the GPT's own two names)
    assert sorted(keys) == sorted(n for n, _ in compiled.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize("compiled_before", [False, True])
@pytest.mark.parametrize("compile", [False, True])
def test_a_checkpoint_with_the_forwards_copies_loads(compiled_before, compile):
    """The older layout: ``forward_model`` registered beside ``model`` (``forward_model._orig_mod.*`` compiled)."""
    old = _module(False)
    del old.forward_model
    old.add_module("forward_model", torch.compile(old.model) if compiled_before else old.model)
    checkpoint = {"state_dict": old.state_dict(), "tokens_seen": 512}
    prefix = "forward_model._orig_mod." if compiled_before else "forward_model."
    assert sum(k.startswith(prefix) for k in checkpoint["state_dict"]) == len(old.model.state_dict())

    new = _module(compile)
    torch.nn.init.zeros_(new.model.wte.weight)
    new.on_load_checkpoint(checkpoint)  # as Lightning calls it, before the (strict) load
    new.load_state_dict(checkpoint["state_dict"])
    for key, value in old.model.state_dict().items():
        assert torch.equal(new.model.state_dict()[key], value)
    assert new.tokens_resumed == 512

    damaged = {k: v.clone() for k, v in old.state_dict().items()}
    damaged[prefix + "wte.weight"] += 1
    with pytest.raises(RuntimeError, match=f"{prefix}wte.weight is not a copy of model.wte.weight"):
        new.on_load_checkpoint({"state_dict": damaged})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, token_cache):
    """The uninterrupted run, eager."""
    results = tmp_path_factory.mktemp("straight")
    return run(compose("train", [*TINY, *TRAIN_PHASE, f"results_dir={results}", f"data.cache_dir={token_cache}"]))


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(True, False), (False, True)])
def test_a_run_preempted_with_compile_on_resumes_with_it_off_and_the_reverse(first, then, compose_train, tmp_path,
                                                                              token_cache, straight):
    results = tmp_path / "results"
    proc = _popen([*TINY, *TRAIN_PHASE, f"train.compile={first}", f"results_dir={results}",
                   f"data.cache_dir={token_cache}"])
    seen = _wait_for_line(proc, "step 10/")
    os.kill(proc.pid, signal.SIGTERM)
    output = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]

    (ckpt,) = (results / "default" / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 10 <= saved["global_step"] < straight["optim"]["total_steps"]
    assert all(k.startswith("model.") for k in saved["state_dict"])  # the model's tensors, once

    resumed = run(compose_train(*TRAIN_PHASE, f"train.compile={then}"))
    assert resumed["status"] == "ok", resumed.get("error")
    assert resumed["run_id"] == straight["run_id"]
    assert resumed["timing"]["resumed_from_tokens"] == saved["tokens_seen"] > 0
    assert resumed["tokens"] == straight["tokens"]  # the budget exactly, the same windows in the same order
    assert [a["ended"] for a in resumed["attempts"]] == ["interrupted (SIGTERM during training)", "ok"]
    # compiled kernels round differently from eager ones: the same training, not the same bits
    assert resumed["loss"]["final"] == pytest.approx(straight["loss"]["final"], rel=1e-5)
