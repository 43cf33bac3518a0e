"""Static memory estimate of an annotated graph: the peak of live activation bytes, and where it is reached.

In the spirit of Inductor's ``estimate_peak_memory`` (torch/_inductor/memory.py): walk the nodes in execution order;
a node allocates its fresh outputs (peak candidate: everything live plus them), then every storage whose last user
was this node is freed. What counts:

- **storages, not values**: a view (``view``, ``reshape`` of a contiguous tensor, ``permute``, basic indexing, a
  ``getitem`` on a tuple), an in-place op (``add_``, ``ReLU(inplace=True)``) and an identity (``nn.Identity``,
  dropout in eval, ``.to()``/``.contiguous()`` that return their input) share their argument's storage, which lives
  until the last user of any value that refers to it;
- **activations only**: inputs (placeholders) and parameters/buffers (``get_attr``) belong to the caller and the
  module, never to the forward; views of them are free too;
- **fxopt's fused nodes** (``torch.ops.fxopt.fused``) allocate their outputs and nothing else (their intermediates
  live in registers), like any other node with fresh outputs;
- the graph's outputs stay live to the end (they are returned).

Not seen: memory an op allocates and frees inside itself (cuDNN/cuBLAS workspaces, ATen temporaries such as
LayerNorm's mean/rstd), and the insides of opaque ``call_module`` nodes. The estimate is a lower bound of a real
forward's activation peak; for graphs of single ATen ops and fused kernels it is exact at op granularity.

NOTE [FX frees after last use]: this is what the GraphModule actually does. torch.fx's generated ``forward`` ends
the line of each value's last user with ``value = None`` (and a value nobody uses with its own name), so a tensor
dies right after its last use unless a view or a tuple still holds its storage: ``gm.code`` shows it, and
``tests/test_memory.py`` checks it against the code and against the live bytes of a real run
(:func:`traced_peak_bytes`). Eager Python code can hold tensors longer (a local kept until ``return``), so eager's
measured peak can be above its captured graph's estimate, never below it (besides the unseen temporaries above).

Before/after for a chain ``x -> relu -> sigmoid -> * 2`` (1 MiB per value)::

    estimate(captured).peak_bytes    == 2 MiB   # relu and sigmoid live while sigmoid runs
    estimate(fused).peak_bytes       == 1 MiB   # one kernel, one output
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from . import ops
from .launches import InspectionMode

__all__ = ["MemoryEstimate", "estimate", "compare_peaks", "traced_peak_bytes", "fmt_mib"]

# Value structure: a storage id (int) for a tensor, a tuple (dict) of structures for a tuple/list (dict) of results,
# None for anything else. Storage ids index MemoryEstimate.storages; external storages (inputs, weights) are
# negative.
_Value = Any


@dataclass
class Storage:
    """One fresh buffer the forward allocates: who made it, its size, and the positions it lives between."""

    owner: str  # the producing node's name (with "[i]" for the i-th output of a multi-output node)
    nbytes: int
    born: int  # node position
    dies: int  # position of the last node that uses a value holding it (len(nodes) for outputs)


@dataclass
class MemoryEstimate:
    """The static activation peak of one graph (see the module docstring for what counts)."""

    peak_bytes: int
    peak_node: str | None  # the node whose outputs, just allocated, make the peak
    live_at_peak: list[str] = field(default_factory=list)  # storages live at the peak, by owner, largest first
    output_bytes: int = 0  # fresh storages still live at the end (returned to the caller)
    timeline: list[tuple[str, int]] = field(default_factory=list)  # (node, live bytes with its outputs allocated)
    storages: list[Storage] = field(default_factory=list)
    # calls of torch.nn composites kept whole (NOTE [Fast paths] in capture.py): their temporaries are not counted
    opaque: list[str] = field(default_factory=list)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    def __str__(self) -> str:
        return f"activation peak (static) {fmt_mib(self.peak_bytes)} at {self.peak_node}"


def fmt_mib(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**20:.3f} MiB" if nbytes < 2**20 else f"{nbytes / 2**20:.2f} MiB"


def _storage_bytes(tm, alignment: int) -> int:
    """Bytes a tensor with this metadata spans (its strides may leave gaps), rounded up to ``alignment``."""
    shape, stride = tuple(tm.shape), tuple(tm.stride)
    if any(s == 0 for s in shape):
        n = 0
    else:
        n = (1 + sum((s - 1) * st for s, st in zip(shape, stride))) * tm.dtype.itemsize
    return -(-n // alignment) * alignment if alignment > 1 else n


def _is_contiguous(tm) -> bool:
    expected = 1
    for size, stride in reversed(list(zip(tm.shape, tm.stride))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _first_arg(node: fx.Node) -> fx.Node | None:
    src = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return src if isinstance(src, fx.Node) else None


def _alias_source(node: fx.Node, gm: fx.GraphModule | None) -> fx.Node | None:
    """The argument whose storage ``node``'s result shares, or None when the result is fresh."""
    src = _first_arg(node)
    if src is None:
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        return None  # handled by the caller (tuple element or view)
    if node.op == "call_module" and gm is not None:
        m = gm.get_submodule(node.target)
        if ops.returns_input_module(m):  # nn.Identity, dropout
            return src
        if ops.is_reshape_module(m):
            return src if _reshape_is_view(src, node) else None
    if gm is not None and ops.is_inplace(node, gm):
        out = node.kwargs.get("out")
        return out if isinstance(out, fx.Node) else src
    if ops.may_copy_reshape(node):  # a view when the input's layout allows it, else a copy
        return src if _reshape_is_view(src, node) else None
    if node.op == "call_function" and ops.is_hidden_alias(node.target):
        return src
    if ops.is_view_like(node):
        return src
    if ops.may_alias_input(node, gm):  # .contiguous(), .to(), dropout: the input itself when nothing changes
        return src if ops.is_identity_copy(node) or _is_dropout_identity(node) else None
    return None


def _reshape_is_view(src: fx.Node, node: fx.Node) -> bool:
    """Whether a reshape of ``src`` to ``node``'s shape is a view: torch's rule (a view wherever ``view`` allows one,
    a channels-last value's ``flatten(2)`` too), tried on a meta tensor of ``src``'s recorded strides."""
    tm, out = ops.tensor_meta(src), ops.tensor_meta(node)
    if tm is None:
        return True
    if out is None:
        return _is_contiguous(tm)
    return ops.view_possible(tm.shape, tm.stride, out.shape)


def _is_dropout_identity(node: fx.Node) -> bool:
    return node.op == "call_function" and "dropout" in getattr(node.target, "__name__", "") and not node.kwargs.get(
        "training", node.args[2] if len(node.args) > 2 else True)


def _alias(base: _Value, meta: Any) -> _Value:
    """The value of a result that shares ``base``'s storage: a tuple of views (split, chunk, unbind) refers to the
    base's storage in each element."""
    if isinstance(meta, (list, tuple)) and isinstance(base, int):
        return tuple(_alias(base, m) for m in meta)
    return base


def estimate(gm: fx.GraphModule, *, alignment: int = 1) -> MemoryEstimate:
    """The static activation peak of ``gm``, annotated by :func:`fxopt.capture.annotate` (``meta["tensor_meta"]``).

    ``alignment`` rounds every storage up (512: the CUDA caching allocator's block granularity, to compare with
    ``torch.cuda.max_memory_allocated``). Nodes without ``tensor_meta`` hold nothing.
    """
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    storages: list[Storage] = []
    value: dict[fx.Node, _Value] = {}
    external = [0]

    def fresh(meta: Any, owner: str, born: int) -> _Value:
        if hasattr(meta, "dtype"):
            storages.append(Storage(owner, _storage_bytes(meta, alignment), born, born))
            return len(storages) - 1
        if isinstance(meta, (list, tuple)):
            return tuple(fresh(m, f"{owner}[{i}]", born) for i, m in enumerate(meta))
        if isinstance(meta, dict):
            return {k: fresh(m, f"{owner}[{k!r}]", born) for k, m in meta.items()}
        return None

    def outside(meta: Any) -> _Value:
        if hasattr(meta, "dtype"):
            external[0] -= 1
            return external[0]
        if isinstance(meta, (list, tuple)):
            return tuple(outside(m) for m in meta)
        if isinstance(meta, dict):
            return {k: outside(m) for k, m in meta.items()}
        return None

    for n in nodes:
        meta = n.meta.get("tensor_meta")
        if n.op == "output":
            continue
        if n.op in ("placeholder", "get_attr"):
            value[n] = outside(meta)
            continue
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            base, idx = value.get(n.args[0]), n.args[1]
            if isinstance(base, tuple):  # an element of a multi-output result
                try:
                    value[n] = base[idx] if isinstance(idx, (int, slice)) else None
                except IndexError:  # the recorded metadata holds fewer values than the graph indexes (fuzz 9900473)
                    value[n] = None
                continue
            if isinstance(base, dict):
                value[n] = base.get(idx)
                continue
            if ops.is_view_like(n):  # basic indexing of a tensor
                value[n] = base
                continue
        src = _alias_source(n, gm)
        if src is not None and src in value:
            value[n] = _alias(value[src], meta)
            continue
        value[n] = fresh(meta, n.name, pos[n])

    def leaves(v: _Value):
        if isinstance(v, (tuple, dict)):
            for x in (v.values() if isinstance(v, dict) else v):
                yield from leaves(x)
        elif isinstance(v, int) and v >= 0:
            yield v

    # A storage dies after the last user of any value that refers to it (NOTE [FX frees after last use]).
    end = len(nodes)
    for n in nodes:
        if n.op == "output":
            continue
        last = max((end if u.op == "output" else pos[u] for u in n.users), default=pos[n])
        for s in leaves(value.get(n)):
            storages[s].dies = max(storages[s].dies, last)

    born_at: dict[int, list[int]] = {}
    dies_at: dict[int, list[int]] = {}
    for i, s in enumerate(storages):
        born_at.setdefault(s.born, []).append(i)
        dies_at.setdefault(s.dies, []).append(i)
    live: set[int] = set()
    live_bytes, peak, peak_at, peak_live = 0, 0, None, []
    timeline = []
    for i, n in enumerate(nodes):
        for s in born_at.get(i, ()):
            live.add(s)
            live_bytes += storages[s].nbytes
        if n.op not in ("placeholder", "get_attr", "output"):
            timeline.append((n.name, live_bytes))
            if live_bytes > peak or peak_at is None:
                peak, peak_at, peak_live = live_bytes, n.name, sorted(live, key=lambda s: -storages[s].nbytes)
        for s in dies_at.get(i, ()):
            live.discard(s)
            live_bytes -= storages[s].nbytes
    opaque = [n.target for n in nodes if n.op == "call_module"
              and ops.is_composite_module(gm.get_submodule(n.target))]
    return MemoryEstimate(peak_bytes=peak, peak_node=peak_at, live_at_peak=[storages[s].owner for s in peak_live],
                          output_bytes=sum(storages[s].nbytes for s in live), timeline=timeline, storages=storages,
                          opaque=opaque)


def compare_peaks(eager: MemoryEstimate, optimized: MemoryEstimate) -> str:
    """One line: ``activation peak (static): eager X MiB / fxopt Y MiB`` (+ where fxopt's is, when above)."""
    line = f"activation peak (static): eager {fmt_mib(eager.peak_bytes)} / fxopt {fmt_mib(optimized.peak_bytes)}"
    if optimized.peak_bytes > eager.peak_bytes:
        line += f" (above eager: at {optimized.peak_node}, live {', '.join(optimized.live_at_peak[:4])})"
    if eager.opaque and not optimized.opaque:  # the comparison is one-sided: say so
        line += (f"; eager's figure leaves out the temporaries inside {', '.join(eager.opaque[:3])} (run as one op), "
                 "which fxopt's graph shows")
    return line


# -- a CPU-measurable check -----------------------------------------------------------------------------------------
class _LiveBytes(InspectionMode):
    """Counts the bytes of the fresh tensors ATen ops return while they are alive (views and in-place results, which
    share an input's storage, count nothing): the CPU allocator keeps no statistics, this sees what a run holds."""

    def __init__(self, alignment: int = 1):
        super().__init__()
        self.alignment = alignment
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or ops.is_hidden_alias(func):
            return out
        held = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in held or ptr in self._seen or ptr == 0:
                continue
            n = t.untyped_storage().nbytes()
            n = -(-n // self.alignment) * self.alignment if self.alignment > 1 else n
            self._seen.add(ptr)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr, n)
        return out

    def _free(self, ptr: int, n: int) -> None:
        self._seen.discard(ptr)
        self.live -= n


def traced_peak_bytes(fn: Callable[..., Any], inputs: Sequence[Any], *, alignment: int = 1) -> tuple[int, int]:
    """(peak, still live at the end) of the bytes held by tensors that ATen ops created during one call of ``fn``.

    Runs on any device (it needs no allocator statistics): the measured counterpart of :func:`estimate`. It sees
    every dispatched op, including temporaries inside a module (LayerNorm's mean/rstd) and the outputs of fxopt's
    kernels (``torch.empty_strided``), not what a kernel allocates behind ATen's back (cuDNN workspaces, the insides
    of a fused ATen op such as eager TransformerEncoderLayer's fast path). A fresh tensor is counted until its
    Python object dies; a view keeps its base alive, so a storage is counted once, for as long as any view lives.
    """
    mode = _LiveBytes(alignment)
    with torch.no_grad(), mode:
        out = fn(*inputs)
    end = mode.live
    del out
    return mode.peak, end
