"""Our GPT as Hugging Face's GPT-2 (``GPT2LMHeadModel``) and back: the config and the state dict, nothing else.

The two architectures are the same computation: learned positions added to the token embedding, pre-norm blocks
(LayerNorm, causal attention scaled by 1/sqrt(head_dim), residual; LayerNorm, MLP with exact erf GELU, residual),
a final LayerNorm and the output head, tied to the embedding or not. What differs is only how the weights are
stored:

* GPT-2's projections are ``Conv1D``, whose weight is the transpose of an ``nn.Linear``'s (in x out);
* GPT-2's projections and LayerNorms have biases and ours have none: they are exported as zeros, and a model whose
  biases are not all zero is refused on import;
* the tied head is stored once, as the embedding (``tie_word_embeddings``); an untied one as ``lm_head.weight``.

``to_hf`` gives ``config.json``'s dict and the tensors of ``model.safetensors``; ``from_hf`` builds our GPT from
them, every shape and setting checked first (``HFError``, one line). Neither imports ``transformers``: the tests
load the exported folder with it and compare logits, generation, assisted generation and held-out loss with ours.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scaling_lab.conf import UserError
from scaling_lab.models.gpt import GPT
from scaling_lab.models.shapes import GPTConfig


class HFError(UserError):
    """A model that our GPT and GPT-2 cannot both express."""


# GPT-2 settings that must hold for its forward to be ours, with transformers' default where config.json may omit
# the key (GPT2Config's activation default is the tanh approximation, "gelu_new": not ours)
SETTINGS = {"activation_function": ("gelu", "gelu_new"), "scale_attn_weights": (True, True),
            "scale_attn_by_inverse_layer_idx": (False, False), "add_cross_attention": (False, False)}
GELU = {"none": "gelu"}  # nn.GELU(approximate=...) -> GPT-2's activation_function


def _pairs(config: GPTConfig) -> list[tuple[str, str, bool]]:
    """(our name, GPT-2's name, transposed) of every weight; the head only when it is not tied."""
    pairs = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False)]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        pairs += [(ours + "ln1.weight", theirs + "ln_1.weight", False),
                  (ours + "attn.qkv.weight", theirs + "attn.c_attn.weight", True),
                  (ours + "attn.proj.weight", theirs + "attn.c_proj.weight", True),
                  (ours + "ln2.weight", theirs + "ln_2.weight", False),
                  (ours + "mlp.0.weight", theirs + "mlp.c_fc.weight", True),
                  (ours + "mlp.2.weight", theirs + "mlp.c_proj.weight", True)]
    pairs.append(("ln_f.weight", "transformer.ln_f.weight", False))
    if not config.tie_embeddings:
        pairs.append(("head.weight", "lm_head.weight", False))
    return pairs


def _has_bias(name: str) -> bool:
    """GPT-2's projections and LayerNorms have a bias; its embeddings and head have none."""
    return name.startswith("transformer.h.") or name.startswith("transformer.ln_f.")


def _check_model(model: GPT) -> tuple[float, str]:
    """(LayerNorm eps, GPT-2's activation) of ``model``: one of each, no biases, or one line saying what is not."""
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    acts = {m.approximate for m in model.modules() if isinstance(m, nn.GELU)}
    biased = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None]
    if len(eps) != 1 or len(acts) != 1 or not acts <= set(GELU) or biased:
        raise HFError(f"this model does not map onto GPT-2: LayerNorm eps {sorted(eps)}, GELU approximations "
                      f"{sorted(acts)} (GPT-2 has one of {sorted(GELU)}), biases {biased[:3]}")
    return eps.pop(), GELU[acts.pop()]


def to_hf(model: GPT, eot: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config.json`` (a dict) and the state dict (CPU, contiguous, zero biases) of ``model`` as GPT-2; ``eot``,
    the end-of-text token id (GPT-2's bos and eos)."""
    c = model.config
    eps, activation = _check_model(model)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.seq_len, "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads,
              "n_inner": c.ffn_hidden, "activation_function": activation, "layer_norm_epsilon": eps,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
              "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
              "reorder_and_upcast_attn": False, "add_cross_attention": False,
              "tie_word_embeddings": c.tie_embeddings, "bos_token_id": eot, "eos_token_id": eot, "use_cache": True,
              "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    ours = model.state_dict()
    state = {}
    for name, hf_name, transposed in _pairs(c):
        t = ours[name].detach().cpu()
        state[hf_name] = (t.t() if transposed else t).contiguous()
        if _has_bias(hf_name):
            state[hf_name[:-len("weight")] + "bias"] = torch.zeros(state[hf_name].shape[-1], dtype=t.dtype)
    return config, state


def hf_shape(config: dict) -> GPTConfig:
    """Our shape of a GPT-2 ``config.json``, every setting our GPT cannot express refused (``HFError``)."""
    if config.get("model_type") != "gpt2":
        raise HFError(f"model_type is {config.get('model_type')!r}: only GPT-2 (gpt2) maps onto our GPT")
    for key, (ours, default) in SETTINGS.items():
        if config.get(key, default) != ours:
            raise HFError(f"{key}={config.get(key, default)!r} in config.json: our GPT has {key}={ours!r}")
    try:
        d, n_inner = int(config["n_embd"]), config.get("n_inner")
        shape = GPTConfig(n_layers=int(config["n_layer"]), d_model=d, n_heads=int(config["n_head"]),
                          vocab_size=int(config["vocab_size"]), seq_len=int(config["n_positions"]),
                          ffn_ratio=(int(n_inner) if n_inner else 4 * d) / d,
                          tie_embeddings=bool(config.get("tie_word_embeddings", True)))
    except KeyError as err:
        raise HFError(f"config.json has no {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise HFError(f"config.json: {err}") from None
    return shape


def from_hf(config: dict, state: dict[str, torch.Tensor]) -> GPT:
    """Our GPT (eval mode) from a GPT-2 ``config.json`` dict and its state dict (names with or without the
    ``transformer.`` prefix); the settings, every tensor's presence and shape, and zero biases checked first."""
    shape = hf_shape(config)
    state = {k if k.startswith("lm_head.") or k.startswith("transformer.") else f"transformer.{k}": v
             for k, v in state.items()}
    model = GPT(shape)
    eps, ours_eps = config.get("layer_norm_epsilon", 1e-5), _check_model(model)[0]
    if eps != ours_eps:
        raise HFError(f"layer_norm_epsilon={eps} in config.json: our GPT has {ours_eps}")
    ours = model.state_dict()
    loaded = {}
    for name, hf_name, transposed in _pairs(shape):
        want = tuple(ours[name].shape[::-1] if transposed else ours[name].shape)
        if hf_name not in state:
            raise HFError(f"the weights have no {hf_name!r} (config.json: {shape})")
        t = state[hf_name]
        if tuple(t.shape) != want:
            raise HFError(f"{hf_name} has shape {tuple(t.shape)}, config.json's shape needs {want}")
        loaded[name] = t.t() if transposed else t
        bias = hf_name[:-len("weight")] + "bias"
        if _has_bias(hf_name) and bias in state and bool(state[bias].any()):
            raise HFError(f"{bias} is not zero: our GPT has no biases")
    if shape.tie_embeddings:
        loaded["head.weight"] = loaded["wte.weight"]
    model.load_state_dict(loaded)
    return model.eval()
