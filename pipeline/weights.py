"""A trained model's weights on disk: safetensors, the format other tools (Hugging Face ``transformers``) read.

``save`` writes a state dict atomically beside its checksum (``fit.io.integrity``); ``load`` verifies the checksum
and reads the tensors back. A safetensors file holds a header of names, dtypes and shapes, then raw tensor bytes:
reading it never runs code, and a file that is not one (a pickle, a truncated copy) is refused in one line. It
stores each tensor once, so a tensor shared under several names (the output head tied to the token embedding) is
written under its first name and the others are listed in the file's metadata (``aliases``); ``load`` gives every
name back, sharing one tensor, so ``model.load_state_dict`` re-ties it.

Weights saved before this format (``torch_state_dict``: ``torch.save`` of the state dict, ``.pt``) still load, data
only (``torch.load(weights_only=True)``), so finished runs stay usable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scaling_lab.fit.io import integrity

FORMAT = "safetensors"
# every format a record's ``weights.format`` may name, and its file suffix
SUFFIXES = {FORMAT: ".safetensors", "torch_state_dict": ".pt"}


def save(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state_dict`` (on the CPU, each shared tensor once) to ``path`` atomically, then its checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, aliases, first = {}, {}, {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t.contiguous()
    metadata = {"format": "pt"}  # what transformers expects of a PyTorch safetensors file
    if aliases:
        metadata["aliases"] = json.dumps(aliases, sort_keys=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.touch()  # the mode a new file gets here (the umask's): safetensors writes its files private (0600)
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, tmp, metadata)
        os.chmod(tmp, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    integrity.replace_checked(tmp, path)
    return path


def load(path: str | Path, remedy: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (on the CPU), its checksum verified first; a ``.pt`` file (the previous format) is
    read data only. A damaged file, or one that is not safetensors, is an ``IntegrityError`` (one line: the file,
    what is wrong, ``remedy``)."""
    path = Path(path)
    if path.suffix == SUFFIXES["torch_state_dict"]:
        return integrity.load_verified(path, lambda p: torch.load(p, map_location="cpu", weights_only=True), remedy)
    integrity.verify(path, remedy)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as err:
        raise integrity.IntegrityError(f"{path} is not a safetensors file ({err}); {remedy}") from None
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
        tensors.update({name: tensors[source] for name, source in aliases.items()})
    except (ValueError, TypeError, KeyError, AttributeError):
        raise integrity.IntegrityError(f"{path} has malformed metadata 'aliases' "
                                       f"{metadata.get('aliases')!r:.80}; {remedy}") from None
    return tensors
