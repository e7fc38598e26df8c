"""Where serving cost is measured: the device every measuring command takes (``device``, the same default in each:
``auto``, a GPU when one is visible, else the CPU), the precision a model is served in there, and what a
measurement records about both.

A model is served as a copy in the device's serving dtype (``serving_copy``): bf16 weights on CUDA, fp32 on the
CPU (where bf16 matmuls are far slower). Never autocast over fp32 weights: that recasts every weight, and the KV
cache, on every decode step, which is not what a served model costs.

Decode on CUDA replays a captured CUDA graph of one token's step (``capture``; ``graph=auto``, the default of every
measuring command): batch-1 decode launched eagerly is bound by kernel launches, so a latency law's per-layer term
would measure dispatch. Every measurement records ``device``, ``dtype``, ``threads`` and ``graph`` (``conditions``),
and measurements that differ in device, dtype or graph mode are never fitted or compared together
(``check_comparable``).
"""

from __future__ import annotations

import copy
import platform
from typing import Any, Callable, Mapping

import torch

from scaling_lab.conf import UserError

DEFAULT = "auto"
CHOICES = ("auto", "cpu", "cuda")


def resolve(name: str | None = DEFAULT) -> torch.device:
    """The torch device a ``device=`` option names (``auto``: CUDA when available, else the CPU); a CUDA device on a
    machine without one is a one-line error, before any compute."""
    name = str(name or DEFAULT)
    kind = name.split(":")[0]
    if kind not in CHOICES:
        raise UserError(f"device={name!r}: choose one of {list(CHOICES)} (cuda:<index> for one GPU of several)")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: no CUDA device is visible here (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda or 'none'}); use device=cpu or device=auto")
    return torch.device(name)


def kind(device: torch.device | str) -> str:
    """``cuda`` or ``cpu``: the device kind a serving mode's configuration is chosen by."""
    return torch.device(device).type


def serving_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a full-precision model is served in on ``device``: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if kind(device) == "cuda" else torch.float32


def serving_copy(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A copy of ``model`` on ``device`` in its serving dtype, in eval mode (the model itself is left as it is)."""
    return copy.deepcopy(model).to(device=torch.device(device), dtype=serving_dtype(device)).eval()


def device_name(device: torch.device | str) -> str:
    """The device as measurements name it: ``cuda:<GPU name>`` or ``cpu:<processor>``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a timing must bracket it on an asynchronous device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ----- how decode runs: eagerly, or one token at a time replaying a captured CUDA graph ---------------------------

GRAPH_CHOICES = ("auto", "true", "false")
EAGER, CUDA_GRAPH = "eager", "cuda-graph"  # what a measurement records as its ``graph``


def use_graph(graph: str | bool | None, device: torch.device | str) -> bool:
    """Whether decode on ``device`` replays a captured CUDA graph: the ``graph=`` option (``auto``: on CUDA, not on
    the CPU; ``true``: CUDA only, a one-line error elsewhere; ``false``: eager everywhere)."""
    value = str("auto" if graph is None else graph).lower()
    if value not in GRAPH_CHOICES:
        raise UserError(f"graph={graph!r}: choose one of {list(GRAPH_CHOICES)} (auto: a CUDA graph on cuda, eager "
                        f"on cpu)")
    if value == "true" and kind(device) != "cuda":
        raise UserError(f"graph=true captures decode as a CUDA graph: it needs device=cuda, not {device}; use "
                        f"graph=auto or graph=false")
    return value == "true" or (value == "auto" and kind(device) == "cuda")


def graph_name(graphed: bool) -> str:
    return CUDA_GRAPH if graphed else EAGER


def capture(step: Callable[[], Any]) -> Callable[[], None]:
    """``step`` captured as a CUDA graph, after three warm-up calls on a side stream (lazy initialisation stays out
    of the graph); returns the graph's replay. A replay repeats exactly the recorded kernels on the same memory: what
    ``step`` reads and writes (a static KV cache, its position, the input tokens) must keep its addresses."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# ----- what a measurement records, and which measurements may be compared ----------------------------------------

COMPARED = ("device", "dtype", "graph")  # measurements that differ in one of these never meet in a fit or comparison


def conditions(device: torch.device | str, graphed: bool, dtype: torch.dtype | None = None) -> dict:
    """How a measurement on ``device`` runs: ``device`` (its name), ``dtype`` (the serving dtype unless given),
    ``threads`` (torch's CPU threads) and ``graph`` (``eager`` or ``cuda-graph``)."""
    dtype = serving_dtype(device) if dtype is None else dtype
    return {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "graph": graph_name(graphed)}


def measured_under(meta: Mapping[str, Any]) -> dict:
    """The ``COMPARED`` fields of a measurement, a record's latency section or a latency law (a ``graph`` missing
    from what older releases wrote reads ``eager``; a missing device, or a dtype that names no torch dtype, as the
    ``object`` older latency sections hold, stays None: not known)."""
    dtype = meta.get("dtype")
    known = isinstance(getattr(torch, str(dtype), None), torch.dtype)
    return {"device": meta.get("device"), "dtype": dtype if known else None, "graph": meta.get("graph") or EAGER}


def check_comparable(a: Mapping[str, Any], b: Mapping[str, Any], a_is: str, b_is: str) -> None:
    """A one-line error when ``a`` and ``b`` (measurements, sections or laws; see ``measured_under``) were measured
    on different devices, in different dtypes or graph modes: they describe different costs. A field one of them
    does not know is not compared."""
    a, b = measured_under(a), measured_under(b)
    for key in COMPARED:
        if a[key] is not None and b[key] is not None and str(a[key]) != str(b[key]):
            raise UserError(f"{a_is} was measured with {key} {a[key]!r}, {b_is} with {key} {b[key]!r}: measurements "
                            f"of different devices, dtypes or graph modes are not compared")
