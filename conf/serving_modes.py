"""The serving modes' table: one YAML file per mode (``conf/serving_mode/<name>.yaml``), read here without torch, by
the measuring side (``pipeline/serving.py`` builds the torchao config and quantizes by it) and the pricing side
(``fit/latency.py``'s bytes and packing rule, ``scaling-plan``'s modes and GPU peak FLOP/s).

A mode file holds, per device kind (``cpu``, ``cuda``), the kernel that serves the mode there::

    description: INT4 weight-only, groups of 32 input channels     # one line, printed with the mode
    group_size: 32            # optional: weights quantized in groups of this many input channels (passed to the
                              # config as group_size; a Linear's in_features must be a multiple of it)
    cpu:
      config: PrototypeInt4WeightOnlyConfig   # a torchao config class by name (TORCHAO_CONFIGS); absent: no
                                              # quantization (full precision)
      args: {}                # its keyword arguments: plain values; an enum by its name or value, a dtype by name,
                              # a granularity by name (PerRow, PerTensor)
      weight_type: Int4OpaqueTensor   # the tensor class a quantized Linear's weight must have afterwards
      group_sizes: [32, 64, 128]      # the group sizes its kernel takes (a command's group_size= picks among them)
      packs: {in_features: 1, out_features: 16}   # a Linear is quantized only when its widths are multiples of
                              # these (and in_features of the group size); any other stays in full precision and is
                              # reported as skipped
      bytes_per_weight: 0.5   # bytes a quantized weight reads (the latency law's quant_bytes term)
      activation: float32     # the dtype the matmuls take their inputs in
      peak_flops_dtype: null  # the key of scaling-plan's GPU table (presets.gpus) its FLOPs are priced at
      requires: {compute_capability: 8.9}   # cuda only: the least compute capability it runs on

A mode asked for on a device kind it has no entry for, or on a GPU below its ``requires``, is refused in one line
naming the mode, the device and what it supports. Nothing read from a file runs as code: the config is looked up
by name in ``TORCHAO_CONFIGS``, every key is checked, and a bad file is one line naming it.

Your own modes: put ``<name>.yaml`` in ``<dir>/serving_mode/`` and run any command with
``hydra.searchpath=[file://<dir>]`` (the folder Hydra searches for config groups). Every such folder's modes join
the package's; a name given twice is refused. Outside a command (tests, scripts) pass ``dirs=`` instead.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from scaling_lab.conf import CONF_DIR, UserError

FOLDER = "serving_mode"
KINDS = ("cpu", "cuda")
# The torchao config classes a mode may name, and the module each is imported from (pipeline/serving.py).
TORCHAO_CONFIGS = {
    "Int8DynamicActivationInt8WeightConfig": "torchao.quantization",
    "Int8WeightOnlyConfig": "torchao.quantization",
    "Int4WeightOnlyConfig": "torchao.quantization",
    "Float8WeightOnlyConfig": "torchao.quantization",
    "Float8DynamicActivationFloat8WeightConfig": "torchao.quantization",
    "IntxWeightOnlyConfig": "torchao.quantization",
    "PrototypeInt4WeightOnlyConfig": "torchao.prototype.quantization.int4",
}
ACTIVATIONS = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "float8_e5m2")
RESERVED = ("auto", "speculative")  # scaling-plan's serving.mode values that are not table modes
MODE_KEYS = {"description", "group_size", *KINDS}
KERNEL_KEYS = {"config", "args", "weight_type", "group_sizes", "packs", "bytes_per_weight", "activation",
               "peak_flops_dtype", "requires"}


class ServingModeError(UserError):
    """A serving mode that does not exist, a bad mode file, or a mode its device cannot run."""


@dataclass(frozen=True)
class Kernel:
    """One device kind's entry of a mode: what serves the mode there and which Linears it packs."""

    mode: str
    kind: str
    source: str                                   # the mode's file
    config: str | None = None                     # None: full precision, nothing quantized
    args: dict = field(default_factory=dict)
    weight_type: str | None = None
    group_size: int | None = None                 # the mode's
    group_sizes: tuple[int, ...] | None = None
    in_multiple: int = 1
    out_multiple: int = 1
    bytes_per_weight: float = 4.0
    activation: str = "float32"
    peak_flops_dtype: str | None = None
    compute_capability: tuple[int, int] | None = None

    @property
    def quantizes(self) -> bool:
        return self.config is not None

    def group(self, group_size: int | None = None) -> int | None:
        """The group size used: ``group_size`` when given (for a mode that has one), else the mode's."""
        if self.group_size is None:
            return None
        chosen = self.group_size if group_size is None else int(group_size)
        if self.group_sizes and chosen not in self.group_sizes:
            raise ServingModeError(f"serving mode {self.mode} on {self.kind}: group size {chosen} is not one its "
                                   f"kernel takes ({list(self.group_sizes)}; {self.source})")
        return chosen

    def packs(self, in_features, out_features, group_size: int | None = None):
        """Whether this kernel quantizes a Linear of these widths (ints, or numpy arrays elementwise)."""
        group = self.group(group_size) or 1
        return ((in_features % group == 0) & (in_features % self.in_multiple == 0)
                & (out_features % self.out_multiple == 0))

    def why_skipped(self, in_features: int, out_features: int, group_size: int | None = None) -> str | None:
        """Why a Linear of these widths stays in full precision (None: it is quantized)."""
        group = self.group(group_size)
        reasons = [f"in_features {in_features} not a multiple of {what}"
                   for what, n in ((f"group size {group}", group), (str(self.in_multiple), self.in_multiple))
                   if n and in_features % n]
        if out_features % self.out_multiple:
            reasons.append(f"out_features {out_features} not a multiple of {self.out_multiple}")
        return "; ".join(reasons) or None

    def check_device(self, capability: tuple[int, int] | None) -> None:
        """Refuse a GPU below the entry's compute capability (``capability`` None: not checked)."""
        need = self.compute_capability
        if need and capability is not None and tuple(capability) < need:
            raise ServingModeError(f"serving mode {self.mode} on cuda needs compute capability >= {need[0]}.{need[1]}"
                                   f" ({self.config}); this GPU has {capability[0]}.{capability[1]} ({self.source})")


@dataclass(frozen=True)
class Mode:
    """A serving mode: its file, and one ``Kernel`` per device kind it runs on."""

    name: str
    source: str
    description: str
    kernels: dict[str, Kernel]

    def on(self, kind: str, capability: tuple[int, int] | None = None) -> Kernel:
        """The kernel serving this mode on a device of ``kind``, or a one-line refusal."""
        if kind not in self.kernels:
            raise ServingModeError(f"serving mode {self.name} has no entry for device {kind}: it runs on "
                                   f"{', '.join(self.kernels)} ({self.source})")
        kernel = self.kernels[kind]
        kernel.check_device(capability)
        return kernel


def _fail(path: Path, message: str):
    raise ServingModeError(f"{path}: {message}")


def _number(path, where: str, value, kind=float, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        _fail(path, f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if positive and not value > 0:
        _fail(path, f"{where} must be > 0, got {value!r}")
    return kind(value)


def _name(path, where: str, value, allowed: Iterable[str] | None = None, optional=True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        _fail(path, f"{where} must be a name, got {value!r}")
    allowed = list(allowed) if allowed is not None else None
    if allowed is not None and value not in allowed:
        _fail(path, f"{where}={value!r} is not one of {allowed}")
    return value


def _capability(path, value) -> tuple[int, int]:
    text = str(value)
    if not re.fullmatch(r"\d+(\.\d+)?", text):
        _fail(path, f"requires.compute_capability must be like 8.9, got {value!r}")
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def _kernel(path: Path, mode: str, kind: str, spec, group_size: int | None) -> Kernel:
    if not isinstance(spec, dict):
        _fail(path, f"{kind} must be a mapping of {sorted(KERNEL_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - KERNEL_KEYS)
    if unknown:
        _fail(path, f"unknown key {kind}.{unknown[0]} (a device entry takes {sorted(KERNEL_KEYS)})")
    config = _name(path, f"{kind}.config", spec.get("config"), TORCHAO_CONFIGS)
    args = spec.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        _fail(path, f"{kind}.args must be a mapping of keyword arguments, got {args!r}")
    for key, value in args.items():
        plain = (str, int, float, bool, type(None))
        if not (isinstance(value, plain) or (isinstance(value, list) and all(isinstance(v, plain) for v in value))):
            _fail(path, f"{kind}.args.{key} must be a plain value (or a list of them), got {value!r}")
    if "group_size" in args:
        _fail(path, f"{kind}.args.group_size: the group size is the mode's group_size (written once)")
    if config is None and (args or spec.get("weight_type") or spec.get("group_sizes")):
        _fail(path, f"{kind}: args, weight_type and group_sizes need a config")
    if config is not None and not spec.get("weight_type"):
        _fail(path, f"{kind}.weight_type is required with a config (the tensor class it leaves on a weight)")
    group_sizes = spec.get("group_sizes")
    if group_sizes is not None:
        if not isinstance(group_sizes, list) or not group_sizes:
            _fail(path, f"{kind}.group_sizes must be a list of integers, got {group_sizes!r}")
        group_sizes = tuple(_number(path, f"{kind}.group_sizes", g, int) for g in group_sizes)
        if group_size is not None and group_size not in group_sizes:
            _fail(path, f"group_size {group_size} is not one of {kind}.group_sizes {list(group_sizes)}")
    packs = spec.get("packs") or {}
    if not isinstance(packs, dict) or set(packs) - {"in_features", "out_features"}:
        _fail(path, f"{kind}.packs takes in_features and out_features (multiples), got {packs!r}")
    requires = spec.get("requires") or {}
    if not isinstance(requires, dict) or set(requires) - {"compute_capability"}:
        _fail(path, f"{kind}.requires takes compute_capability, got {requires!r}")
    if requires and kind != "cuda":
        _fail(path, f"{kind}.requires: a compute capability is a cuda requirement")
    if "bytes_per_weight" not in spec or "activation" not in spec:
        _fail(path, f"{kind} needs bytes_per_weight and activation")
    return Kernel(
        mode=mode, kind=kind, source=str(path), config=config, args=dict(args),
        weight_type=_name(path, f"{kind}.weight_type", spec.get("weight_type")), group_size=group_size,
        group_sizes=group_sizes,
        in_multiple=_number(path, f"{kind}.packs.in_features", packs.get("in_features", 1), int),
        out_multiple=_number(path, f"{kind}.packs.out_features", packs.get("out_features", 1), int),
        bytes_per_weight=_number(path, f"{kind}.bytes_per_weight", spec["bytes_per_weight"]),
        activation=_name(path, f"{kind}.activation", spec["activation"], ACTIVATIONS, optional=False),
        peak_flops_dtype=_name(path, f"{kind}.peak_flops_dtype", spec.get("peak_flops_dtype")),
        compute_capability=(_capability(path, requires["compute_capability"])
                            if "compute_capability" in requires else None))


def read_mode(path: Path) -> Mode:
    """One mode file, checked (its name is the file's stem)."""
    path = Path(path)
    name = path.stem
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name in RESERVED:
        _fail(path, f"a serving mode's name (the file's stem) is letters, digits and _, and not {list(RESERVED)}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        _fail(path, f"not valid YAML ({' '.join(str(err).split())})")
    if not isinstance(spec, dict):
        _fail(path, f"a serving mode is a mapping of {sorted(MODE_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - MODE_KEYS)
    if unknown:
        _fail(path, f"unknown key {unknown[0]!r} (a serving mode takes {sorted(MODE_KEYS)})")
    kinds = [k for k in KINDS if k in spec]
    if not kinds:
        _fail(path, f"a serving mode needs an entry for at least one device kind of {list(KINDS)}")
    group = spec.get("group_size")
    group = None if group is None else _number(path, "group_size", group, int)
    description = spec.get("description") or ""
    if not isinstance(description, str):
        _fail(path, f"description must be text, got {description!r}")
    return Mode(name=name, source=str(path), description=description,
                kernels={k: _kernel(path, name, k, spec[k], group) for k in kinds})


def search_dirs() -> tuple[Path, ...]:
    """The folders holding ``serving_mode/``: the package's conf, then the running command's Hydra search path
    (``hydra.searchpath=[file://<dir>]``, ``--config-dir``)."""
    dirs = [CONF_DIR]
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            for source in HydraConfig.get().runtime.config_sources:
                if source.schema == "file" and source.provider != "main":
                    dirs.append(Path(source.path))
    except (ImportError, ValueError):
        pass
    return tuple(dict.fromkeys(Path(d).resolve() for d in dirs))


@functools.lru_cache(maxsize=16)
def _read(dirs: tuple[Path, ...]) -> dict[str, Mode]:
    modes: dict[str, Mode] = {}
    for folder in dirs:
        for path in sorted((folder / FOLDER).glob("*.yaml")):
            mode = read_mode(path)
            if mode.name in modes:
                raise ServingModeError(f"serving mode {mode.name} is defined twice: {modes[mode.name].source} and "
                                       f"{path}; rename one")
            modes[mode.name] = mode
    return modes


def table(dirs: Iterable[str | Path] = ()) -> dict[str, Mode]:
    """Every serving mode (``none`` first): the package's, the command's search path's and ``dirs``' (each a
    folder holding ``serving_mode/``). Read once per set of folders."""
    folders = tuple(dict.fromkeys((*search_dirs(), *(Path(d).resolve() for d in dirs))))
    modes = _read(folders)
    return dict(sorted(modes.items(), key=lambda item: item[0] != "none"))


def names(dirs: Iterable[str | Path] = ()) -> list[str]:
    return list(table(dirs))


def get(name: str, dirs: Iterable[str | Path] = ()) -> Mode:
    """The mode ``name``, or a one-line error naming the modes there are and how to add one."""
    modes = table(dirs)
    if str(name) not in modes:
        raise ServingModeError(f"unknown serving mode {name!r}: choose one of {list(modes)} (conf/serving_mode/; "
                               f"add your own as <dir>/serving_mode/<name>.yaml with hydra.searchpath=[file://<dir>])")
    return modes[str(name)]


def kind_of(device: str) -> str:
    """The device kind of a measurement's device name (``cuda:<GPU>`` -> cuda; anything else prices as cpu)."""
    return "cuda" if str(device).split(":")[0] == "cuda" else "cpu"
