"""Saved artifacts: ``fxopt.save(optimized, path)`` and ``fxopt.load(path)``.

An artifact is a directory::

    manifest.json          format, fxopt and torch versions, device, every file's sha256; per saved signature its
                           program, its batch range (or why it has none) and the batch sizes it was checked at
    program_0.pt2          one torch.export program per input signature: the rewritten graph and its weights
    kernels/NAME.json      each generated kernel's program (what it computes, in fxopt's IR: an elementwise region
                           and its modes, a row-wise program, or a template kernel's: short-query attention, GEMV)
    kernels/NAME.cu|.cpp   its source
    kernels/NAME.cubin|.so its compiled binary, for the device it was built on

Each program is exported with a dynamic batch (dim 0 of the inputs, NOTE [Dynamic batch]) where the graph allows it:
fxopt's kernels take their sizes at run time, so an artifact saved after batch 8 also serves batch 3, 1 or 17. A
graph that fixes its batch size (a reshape to a literal batch, a folded constant of the batch's size) is exported for
its own batch alone, with the reason in the manifest and in :meth:`LoadedModule.summary`; a batch no program accepts
is refused with an error that lists what the artifact accepts.

Loading needs neither the model's source class nor re-optimizing. A file whose hash does not match, another
torch version, or another artifact format is refused with :class:`ArtifactError`. A kernel binary is used only when
the source fxopt generates now from the saved region is byte-identical to the saved source and the GPU architecture
(or, on CPU, the platform) is the same; otherwise the kernel is compiled again from source. It never runs code
that does not correspond to the region the graph was verified with.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import platform
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__, ops
from .codegen.attention import AttentionProgram
from .codegen.depthwise import DepthwiseProgram
from .codegen.gemv import GemvProgram
from .codegen.printer import Mode
from .codegen.region import Region, Stmt
from .errors import FxoptError
from .grad import inference_only
from .state import preserved
from .runtime import kernel as kernel_mod
from .runtime.attention import AttentionKernel
from .runtime.depthwise import DepthwiseKernel
from .runtime.gemv import GemvKernel
from .runtime.kernel import FusedKernel
from .runtime.lower import lower_for_execution
from .runtime.rowwise import RowwiseKernel
from .runtime.streams import without_streams
from .runtime.strides import contiguous_strides, is_non_overlapping_and_dense
from .verify import compare, computed_precision, layout_copy, tf32_in_use

log = logging.getLogger(__name__)

# Version 1 still: the batch fields are optional, an artifact without them loads as one exact signature per program.
FORMAT = "fxopt-artifact/1"
BATCH_DIM = 0  # the dimension exported dynamic (NOTE [Dynamic batch])


class ArtifactError(FxoptError):
    """An artifact that cannot be loaded as it is: corrupted, from another torch, or of an unknown format."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype an artifact names (``"torch.float16"`` or ``"float16"``); ArtifactError for anything else."""
    value = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in artifact")
    return value


def _region_to_json(region: Region) -> dict[str, Any]:
    return {"name": region.name, "input_dtypes": [str(d) for d in region.input_dtypes],
            "stmts": [[s.var, str(s.dtype), s.expr, s.op] for s in region.stmts],
            "outputs": [[v, str(d)] for v, d in region.outputs], "ndim": region.ndim, "op_names": region.op_names,
            "rotated_inputs": list(region.rotated_inputs), "scatter_dim": region.scatter_dim}


def _region_from_json(data: dict[str, Any]) -> Region:
    return Region(data["name"], [dtype_named(d) for d in data["input_dtypes"]],
                  [Stmt(v, dtype_named(d), e, op) for v, d, e, op in data["stmts"]],
                  [(v, dtype_named(d)) for v, d in data["outputs"]], data["ndim"], list(data["op_names"]),
                  tuple(data.get("rotated_inputs", ())), data.get("scatter_dim"))


def _layout_from_json(data):
    """A kernel's layout program (runtime/strides.py) from its JSON lists, or None."""
    if data is None:
        return None
    steps, outputs = data
    return (tuple((op, tuple(tuple(r) for r in refs)) for op, refs in steps), tuple(tuple(r) for r in outputs))


def _program_to_json(program) -> dict[str, Any]:
    """A row-wise kernel's RowProgram (codegen/rowwise.py) as JSON: its dataclasses field by field."""
    import dataclasses

    def encode(obj):
        if isinstance(obj, torch.dtype):
            return {"dtype": str(obj)}
        if dataclasses.is_dataclass(obj):
            fields = {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            return {"type": type(obj).__name__, **fields}
        if isinstance(obj, (list, tuple)):
            return [encode(v) for v in obj]
        return obj

    return encode(program)


def _program_from_json(data: dict[str, Any]):
    from .codegen import rowwise

    types = {t.__name__: t for t in (rowwise.RowProgram, rowwise.RowInput, rowwise.RowStmt, rowwise.RowStage,
                                     rowwise.RowOutput)}

    def decode(obj):
        if isinstance(obj, dict) and set(obj) == {"dtype"}:
            return dtype_named(obj["dtype"])
        if isinstance(obj, dict):
            cls = types.get(obj.get("type"))
            if cls is None:
                raise ArtifactError(f"unknown row-wise program part {obj.get('type')!r} in artifact")
            fields = {k: decode(v) for k, v in obj.items() if k != "type"}
            if cls is rowwise.RowStmt:
                fields["deps"] = tuple(fields["deps"])
            if cls is rowwise.RowOutput and fields.get("order") is not None:
                fields["order"] = tuple(fields["order"])
            return cls(**fields)
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(data)


def _platform_key() -> str:
    from .runtime.cc import compiler_info

    info = compiler_info()
    return f"{platform.system()}-{platform.machine()}-{info.version if info else 'no-compiler'}"


def save(optimized, path: str | Path) -> Path:
    """Write ``optimized`` (an :class:`~fxopt.OptimizedModule`) to the directory ``path`` (replaced if present).

    Each input signature the module was specialized for becomes one torch.export program, with a dynamic batch
    (dim 0) where its graph allows it and the model agrees at other batch sizes (NOTE [Dynamic batch]); otherwise
    the program serves its own signature alone and the manifest says why.
    """
    from .api import OptimizedModule

    if not isinstance(optimized, OptimizedModule):
        raise TypeError(f"fxopt.save expects an OptimizedModule, got {type(optimized).__name__}")
    if optimized.unoptimized_reason is not None:
        raise ArtifactError(f"nothing to save: the model runs unoptimized ({optimized.unoptimized_reason})")
    specs = optimized.specializations
    if not specs:
        raise ArtifactError("nothing to save yet: call the module once, or optimize it with example_inputs")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "kernels").mkdir(parents=True)
    files: dict[str, str] = {}
    manifest: dict[str, Any] = {"format": FORMAT, "fxopt": __version__, "torch": torch.__version__,
                                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                "devices": sorted({str(s[3]) for spec in specs for s in spec.input_specs}),
                                "specializations": [], "kernels": []}
    saved_kernels: set[str] = set()
    for i, spec in enumerate(specs):
        for k in spec.kernels.values():
            if not isinstance(k, (FusedKernel, RowwiseKernel)) and _template_kind(k) is None:
                raise ArtifactError(f"kernel {k.name} ({type(k).__name__}, {getattr(k, 'backend', '?')}) cannot be "
                                    f"saved: only fxopt's generated kernels can (Inductor's and registered user "
                                    f"kernels cannot); optimize with backend='auto', 'cuda' or 'cpp' to save")
        with preserved(optimized.original):  # export and its checks run the graph: the model's state stays as it was
            program, batch, note = _export(optimized, spec)
        name = f"program_{i}.pt2"
        torch.export.save(program, tmp / name)
        if note is not None:
            log.info("fxopt.save: %s: %s", name, note)
        manifest["specializations"].append({"program": name, "signature": _signature_json(spec.example_inputs),
                                            "backend": spec.backend, "batch": batch, "note": note})
        for k in spec.kernels.values():
            if k.name not in saved_kernels:
                manifest["kernels"].append(_save_kernel(k, tmp / "kernels"))
                saved_kernels.add(k.name)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            files[str(f.relative_to(tmp))] = _sha256(f)
    manifest["files"] = files
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _signature_json(inputs) -> list[dict[str, Any]]:
    # strides too: a specialization is built for its inputs' layout (api.input_signature)
    return [{"shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype), "device": str(t.device)}
            for t in inputs]


# -- the dynamic batch -------------------------------------------------------------------------------------------
# NOTE [Dynamic batch]: fxopt's generated kernels take their sizes at run time (an elementwise kernel its element
# count and strides, a row-wise kernel its rows and batch strides, planned per input shape), so one saved graph can
# serve every batch size its graph allows. save() exports dim 0 of the inputs as torch.export.Dim("batch", min=1):
#   * a named Dim, not Dim.AUTO: export raises when the graph fixes the batch size instead of silently keeping it
#     static, and that error is how save() learns the graph cannot serve other batches (Dim.DYNAMIC raises too, but
#     its defaults and messages moved between torch releases; a named Dim reads the same on torch 2.11 and 2.13);
#   * min=1: the range includes batch 1 (without it, export's range starts at 2 on some releases). The range a
#     program really has is read back from its range_constraints, not assumed.
# torch.export specializes sizes 0 and 1: an example of batch 1 makes the batch the constant 1, and tracing assumes
# a dynamic size is neither 0 nor 1. So the example it traces has batch >= 2: a signature of batch 1 is exported with
# an example of batch 2 built from it (same per-sample shape, dtype, device and layout). Export's soundness does not
# cover what a pass baked into the graph without a guard (a value computed from the batch size and folded into a
# constant), nor 0/1 specialization, so every dynamic program runs against the model (fxopt's eval copy) at batch
# 1, its own batch and a batch it never saw before it is saved. A mismatch at batch 1 alone re-exports the program
# from batch 2 on (a signature of batch 1 then stays static); any other mismatch, or an export that fails, saves the
# static program, with the reason as the manifest's note.

def _export(optimized, spec) -> tuple[Any, dict[str, Any] | None, str | None]:
    """The program to save for ``spec``: (ExportedProgram, its batch entry or None when static, a note or None)."""
    gm = without_streams(spec.graph_module)  # an exported program holds no streams or events
    batched, why = _batch_inputs(spec.input_specs)
    if batched:
        got = _export_dynamic(optimized, spec, gm, batched)
        if not isinstance(got, str):
            return got
        why = got
    batch = spec.input_specs[0][0][0] if spec.input_specs and len(spec.input_specs[0][0]) else None
    note = f"exported for this signature alone{'' if batch is None else f' (batch {batch})'}: {why}"
    return torch.export.export(gm, tuple(spec.example_inputs), strict=False), None, note


def _batch_inputs(input_specs: Sequence[tuple]) -> tuple[list[int], str | None]:
    """The tensor inputs whose dim 0 is the batch (those of input 0's dim 0), or [] and why there is none."""
    if not input_specs:
        return [], "the module takes no tensor inputs"
    shape0, stride0 = input_specs[0][0], input_specs[0][1]
    if len(shape0) == 0:
        return [], "input 0 is a 0-dim tensor (no batch dimension)"
    if shape0[0] == 0:
        return [], "the saved batch is empty (size 0)"
    if not is_non_overlapping_and_dense(shape0, stride0):
        return [], (f"input 0 is not dense (shape {list(shape0)}, strides {list(stride0)}): its layout at another "
                    "batch size is not defined")
    return [i for i, (shape, stride, _, _) in enumerate(input_specs)
            if len(shape) and shape[0] == shape0[0] and is_non_overlapping_and_dense(shape, stride)], None


def batch_strides(shape: Sequence[int], stride: Sequence[int], batch: int) -> tuple[int, ...]:
    """The strides of a dense tensor laid out like (``shape``, ``stride``) with dim 0 resized to ``batch``: the same
    dimension order (a batch dim of size 1 is taken as outermost); dims of size 1 keep their stride."""
    order = sorted((d for d in range(len(shape)) if shape[d] != 1 or d == BATCH_DIM),
                   key=lambda d: (shape[d] == 1, stride[d], -d))  # innermost first; a size-1 batch dim last
    sizes = [batch if d == BATCH_DIM else n for d, n in enumerate(shape)]
    out, acc = list(stride), 1
    for d in order:
        out[d] = acc
        acc *= max(sizes[d], 1)
    return tuple(out)


def _inputs_at(input_specs: Sequence[tuple], batched: Sequence[int], batch: int) -> tuple[torch.Tensor, ...]:
    """Inputs of ``input_specs`` with dim 0 of the ``batched`` ones resized to ``batch``, in the same layout; random
    floats from a private generator (the caller's RNG state is left alone), zeros otherwise."""
    gen = torch.Generator().manual_seed(batch)
    out = []
    for i, (shape, stride, dtype, device) in enumerate(input_specs):
        if i in batched:
            shape, stride = (batch, *shape[1:]), batch_strides(shape, stride, batch)
        t = torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=device)
        if dtype.is_floating_point:
            t.copy_(torch.randn(tuple(shape), generator=gen))
        else:
            t.zero_()
        out.append(t)
    return tuple(out)


def _export_dynamic(optimized, spec, gm, batched: list[int]) -> tuple[Any, dict[str, Any], str | None] | str:
    """The program exported with a dynamic batch and checked against the model, or why it cannot be."""
    saved = spec.input_specs[batched[0]][0][0]
    example = _inputs_at(spec.input_specs, batched, max(saved, 2))  # NOTE [Dynamic batch]: never a batch of 1
    try:
        program = _export_with_batch(gm, example, batched, 1)
    except Exception as e:  # noqa: BLE001 -- NOTE [Dynamic batch]: any failure only costs generality, and says why
        return f"torch.export cannot keep the batch dynamic: {_export_failure(e)}{_literal_batch_hint(gm, saved)}"
    low, high = _batch_range(program, batched[0])
    if saved < low or (high is not None and saved > high):
        return f"torch.export gave the batch the range {low}..{high}, without the saved batch {saved}"
    checks = sorted(b for b in {1, 2 if saved == 1 else saved, saved, max(saved + 1, 3)}
                    if b >= low and (high is None or b <= high))
    failures = _check_against_model(optimized, spec, program, batched, checks)
    note = None
    if set(failures) == {1} and saved >= 2:
        note = (f"serves batch sizes from 2 on: at batch 1 {failures[1]} (torch.export traces assuming sizes are not "
                "0 or 1)")
        program = _export_with_batch(gm, example, batched, 2)
        low, high = _batch_range(program, batched[0])
        checks.remove(1)
    elif failures:
        (b, why), *more = failures.items()
        also = f" (and at batch {', '.join(str(m) for m, _ in more)})" if more else ""
        return f"the program exported with a dynamic batch differs from the model at batch {b}: {why}{also}"
    entry = {"dim": BATCH_DIM, "inputs": batched, "min": low, "max": high, "checked": checks,
             "export_batch": int(example[batched[0]].shape[0])}
    return program, entry, note


def _export_with_batch(gm, example: tuple[torch.Tensor, ...], batched: list[int], low: int):
    batch = torch.export.Dim("batch", min=low)
    dynamic = tuple({BATCH_DIM: batch} if i in batched else None for i in range(len(example)))
    return torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)


def _batch_range(program, index: int) -> tuple[int, int | None]:
    """(min, max or None when unbounded) of the exported program's dim 0 of user input ``index``."""
    import sympy

    name = program.graph_signature.user_inputs[index]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    size = node.meta["val"].shape[BATCH_DIM]
    if not isinstance(size, torch.SymInt):  # specialized after all
        return int(size), int(size)
    vr = program.range_constraints[size.node.expr]
    return int(vr.lower), int(vr.upper) if isinstance(vr.upper, sympy.Integer) else None


def _check_against_model(optimized, spec, program, batched: list[int], batches: list[int]) -> dict[int, str]:
    """Run the program as :func:`load` will (lowered) and the model at each batch size; {batch: mismatch}."""
    runner = lower_for_execution(program.module())
    tf32, precision = tf32_in_use(spec.graph_module), computed_precision(spec.graph_module)
    failures: dict[int, str] = {}
    for b in batches:
        args = _inputs_at(spec.input_specs, batched, b)
        with torch.no_grad():
            # NOTE [Dynamic batch]: a run that raises is a failed check with its reason, like a mismatch
            try:
                expected = optimized.original(*[layout_copy(a) for a in args])
            except Exception as e:  # noqa: BLE001
                failures[b] = f"the model itself raises {type(e).__name__}: {_first_line(e)}"
                continue
            try:
                actual = runner.forward(*args)
            except Exception as e:  # noqa: BLE001
                failures[b] = f"the program raises {type(e).__name__}: {_first_line(e)}"
                continue
        mismatch = compare(actual, expected, tf32=tf32, precision=precision)
        if mismatch is not None:
            failures[b] = str(mismatch)
    return failures


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _export_failure(e: BaseException) -> str:
    """What torch.export said, in one line: the constraint it could not keep when there is one."""
    lines = [ln.strip(" -") for ln in str(e).splitlines()]
    for ln in lines:
        found = re.search(r"specialized it to be a constant \((\d+)\)", ln)
        if found:
            return f"the graph fixes the batch size to {found.group(1)} ({type(e).__name__})"
    return f"{type(e).__name__}: {_first_line(e)}"


_SHAPE_OPS = ops.SHAPE_ARGUMENT_OPS


def _literal_batch_hint(gm, batch: int) -> str:
    """Graph nodes that take the batch size as a literal shape argument: where to look for what fixes the batch."""
    import torch.utils._pytree as pytree

    if batch < 2:  # a literal 1 is everywhere
        return ""
    found = []
    for n in gm.graph.nodes:
        if n.op not in ("call_method", "call_function"):
            continue
        name = n.target if isinstance(n.target, str) else str(getattr(n.target, "__name__", n.target))
        if not _SHAPE_OPS & set(name.split(".")):
            continue
        if any(type(a) is int and a == batch for a in pytree.tree_leaves((n.args, n.kwargs))):
            found.append(n.name)
    if not found:
        return ""
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return f"; nodes with the batch size {batch} as a literal shape: {', '.join(found[:3])}{more}"


# Template kernels (runtime/template.py), saved as their program's JSON: kind -> (kernel class, program class)
_TEMPLATE_KERNELS = {"attention": (AttentionKernel, AttentionProgram), "gemv": (GemvKernel, GemvProgram),
                     "depthwise": (DepthwiseKernel, DepthwiseProgram)}


def _template_kind(k: Any) -> str | None:
    return next((kind for kind, (cls, _) in _TEMPLATE_KERNELS.items() if type(k) is cls), None)


def _save_kernel(k: Any, folder: Path) -> dict[str, Any]:
    suffix = ".cu" if k.backend == "cuda" else ".cpp"
    (folder / f"{k.name}{suffix}").write_text(k.source)
    entry: dict[str, Any] = {"name": k.name, "backend": k.backend, "device": str(k.device),
                             "source": f"kernels/{k.name}{suffix}"}
    if isinstance(k, RowwiseKernel):
        entry.update(kind="rowwise", program=_program_to_json(k.program))
    elif _template_kind(k) is not None:
        entry.update(kind=_template_kind(k), program=k.program.to_json())
    else:
        entry.update(kind="elementwise", region=_region_to_json(k.region), modes=[m.value for m in k.modes])
        if k.layout is not None:
            entry["layout"] = k.layout  # JSON: tuples become lists
    binary = k.binary
    if k.backend == "cuda" and isinstance(binary, bytes):
        from .runtime.nvrtc import current_arch

        (folder / f"{k.name}.cubin").write_bytes(binary)
        entry.update(binary=f"kernels/{k.name}.cubin", arch=current_arch(k.device.index))
    elif isinstance(binary, str) and Path(binary).is_file():
        shutil.copyfile(binary, folder / f"{k.name}.so")
        entry.update(binary=f"kernels/{k.name}.so", platform=_platform_key())
    (folder / f"{k.name}.json").write_text(json.dumps(entry, indent=2))
    return entry


# -- loading -----------------------------------------------------------------------------------------------------
@dataclass
class SavedProgram:
    """One saved program as loaded: what it accepts and what runs it."""

    file: str  # program_0.pt2
    entry: dict[str, Any]  # its manifest entry
    exported: Any  # the torch.export.ExportedProgram
    runner: torch.fx.GraphModule  # lower_for_execution(exported.module())

    @property
    def batch(self) -> dict[str, Any] | None:
        """The dynamic batch (dim, inputs, min, max, checked), or None: the saved signature alone."""
        return self.entry.get("batch")

    @property
    def saved_batch(self) -> int | None:
        batch = self.batch
        return None if batch is None else self.entry["signature"][batch["inputs"][0]]["shape"][BATCH_DIM]

    def batch_of(self, args: Sequence[Any]) -> int | None:
        """The batch size of ``args`` when this program's dynamic batch accepts them (same per-sample shapes, dtypes,
        devices and layout, a batch in its range), else None."""
        batch, sig = self.batch, self.entry["signature"]
        if batch is None or len(args) != len(sig) or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        first = args[batch["inputs"][0]]
        if first.dim() == 0:
            return None
        b = first.shape[BATCH_DIM]
        if b < batch["min"] or (batch["max"] is not None and b > batch["max"]):
            return None
        for i, (t, s) in enumerate(zip(args, sig)):
            shape, stride = s["shape"], s.get("stride") or contiguous_strides(s["shape"])
            if i in batch["inputs"]:
                shape, stride = [b, *shape[1:]], batch_strides(shape, stride, b)
            if (list(t.shape) != list(shape) or str(t.dtype) != s["dtype"] or str(t.device) != s["device"]
                    or any(a != e for a, e, n in zip(t.stride(), stride, shape) if n != 1)):
                return None
        return b

    def describe(self) -> str:
        """What the program accepts, e.g. ``float32[B, 3, 32, 32]@cpu, B from 1 on``."""
        batch = self.batch
        batched = set() if batch is None else set(batch["inputs"])
        parts = []
        for i, s in enumerate(self.entry["signature"]):
            dims = [str(n) for n in s["shape"]]
            if i in batched:
                dims[BATCH_DIM] = "B"
            layout = ""
            stride = s.get("stride")
            if stride is not None and any(a != e for a, e, n in zip(stride, contiguous_strides(s["shape"]),
                                                                   s["shape"]) if n != 1):
                layout = " channels_last" if _is_channels_last(s["shape"], stride) else f" strides {stride}"
            parts.append(f"{s['dtype'].replace('torch.', '')}[{', '.join(dims)}]@{s['device']}{layout}")
        text = ", ".join(parts) or "no tensor inputs"
        if batch is not None:
            upper = "on" if batch["max"] is None else f"to {batch['max']}"
            text += f", B from {batch['min']} {upper}"
        return text


def _is_channels_last(shape: Sequence[int], stride: Sequence[int]) -> bool:
    if len(shape) != 4:
        return False
    _, c, h, w = shape
    expected = (h * w * c, 1, w * c, c)
    return all(a == e for a, e, size in zip(stride, expected, shape) if size != 1)


def _saved_signature(signature: list[dict[str, Any]]) -> tuple:
    """api.input_signature of inputs of a saved signature (made for the purpose: the signature's definition stays
    api's)."""
    from .inputs import input_signature

    return input_signature([torch.empty_strided(s["shape"], s.get("stride") or contiguous_strides(s["shape"]),
                                                dtype=dtype_named(s["dtype"]), device=s["device"]) for s in signature])


_SEEN_LIMIT = 256  # input signatures remembered per loaded module (a dict lookup on the next call of each)


class LoadedModule(torch.nn.Module):
    """What :func:`load` returns: runs the saved optimized graphs.

    A call whose inputs match a saved signature exactly runs that signature's program; other batch sizes run the
    program with a dynamic batch whose saved batch is nearest (NOTE [Dynamic batch]); anything else is refused with
    an error that lists what the artifact accepts. :meth:`summary` says what the artifact holds.
    """

    def __init__(self, manifest: dict[str, Any], programs: list[SavedProgram], notes: list[str],
                 kernel_status: dict[str, str] | None = None, path: Path | None = None):
        super().__init__()
        self.manifest = manifest
        self.notes = notes  # e.g. kernels recompiled because the GPU differs
        self.kernel_status = dict(kernel_status or {})  # kernel name -> how its binary was obtained
        self.path = path
        self.programs = list(programs)
        self._exact = {_saved_signature(p.entry["signature"]): p for p in self.programs}
        self._dynamic = [p for p in self.programs if p.batch is not None]
        self._seen: dict[tuple, SavedProgram] = {}  # other signatures met, and the program that serves them

    def forward(self, *args: Any) -> Any:
        from .inputs import input_signature

        sig = input_signature(args)
        program = self._exact.get(sig) or self._seen.get(sig)
        if program is None:
            program = self._for_batch(args, sig)
        if torch.is_grad_enabled():
            # NOTE [Inference only] (fxopt/grad.py): no original model to fall back to here, so under grad mode the
            # outputs require grad where something does, and a backward pass that reaches them raises.
            with torch.no_grad():
                out = program.runner.forward(*args)
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or any(
                    p.requires_grad for p in program.runner.parameters()):
                return inference_only(out)
            return out
        return program.runner.forward(*args)

    def _for_batch(self, args: Sequence[Any], sig: tuple) -> SavedProgram:
        fits = []
        for i, p in enumerate(self._dynamic):
            b = p.batch_of(args)
            if b is not None:
                fits.append((abs(b - p.saved_batch), i))
        if not fits:
            raise ValueError(self._refusal(args))
        program = self._dynamic[min(fits)[1]]
        if len(self._seen) >= _SEEN_LIMIT:
            self._seen = {}  # a fresh dict, not clear(): another thread may be reading this one
        self._seen[sig] = program
        return program

    def _refusal(self, args: Sequence[Any]) -> str:
        got = ", ".join(f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}@{a.device}"
                        + ("" if a.is_contiguous() or a.dim() < 2 else f" strides {list(a.stride())}")
                        if isinstance(a, torch.Tensor) else repr(a) for a in args)
        accepts = [f"{p.describe()} ({p.file}{': ' + p.entry['note'] if p.entry.get('note') else ''})"
                   for p in self.programs]
        return (f"this fxopt artifact does not accept the inputs {got or '()'}. It accepts: {'; '.join(accepts)}. "
                "Pass inputs it accepts, or optimize the model for these inputs too (call the optimized module with "
                "them, or fxopt.optimize(model, inputs)) and save it again with fxopt.save: an artifact holds every "
                "input signature its module was optimized for.")

    def program(self, index: int = 0):
        """The torch.export program of the index-th saved signature."""
        return self.programs[index].exported

    def summary(self) -> str:
        """What the artifact holds: versions and device, each program with the inputs it accepts (the dynamic batch
        and its range, or why it has none) and the batch sizes it was checked against the model at, each kernel
        with its backend and whether its saved binary was reused or compiled anew."""
        from tabulate import tabulate

        m = self.manifest
        where = f"{self.path} " if self.path is not None else ""
        text = (f"fxopt artifact {where}({m['format']}): saved {m.get('created', '?')} by fxopt {m['fxopt']} with "
                f"torch {m['torch']}; loaded by fxopt {__version__} with torch {torch.__version__}\n")
        devices = m.get("devices") or sorted({s["device"] for p in self.programs for s in p.entry["signature"]})
        text += f"device: {', '.join(devices)}\n"
        rows = []
        for p in self.programs:
            batch = p.batch
            if batch is None:
                sig = p.entry["signature"]
                kind = f"static: {sig[0]['shape'][0]} only" if sig and sig[0]["shape"] else "static"
            else:
                upper = "inf" if batch["max"] is None else batch["max"]
                kind = f"dynamic dim {batch['dim']}: {batch['min']}..{upper} (saved at {p.saved_batch})"
            checked = ", ".join(map(str, batch["checked"])) if batch is not None else "-"
            rows.append((p.file, p.describe(), kind, checked, p.entry.get("backend", "?")))
        text += tabulate(rows, ["program", "accepts", "batch", "checked against eager at", "backend"]) + "\n"
        for p in self.programs:
            if p.entry.get("note"):
                text += f"note: {p.file}: {p.entry['note']}\n"
        krows = [(k["name"], k.get("kind", "elementwise"), k["backend"], k["device"],
                  self.kernel_status.get(k["name"], "?")) for k in m["kernels"]]
        text += tabulate(krows, ["kernel", "kind", "backend", "device", "binary"]) if krows else "kernels: none"
        return text + "".join(f"\nnote: {n}" for n in self.notes)


def load(path: str | Path) -> LoadedModule:
    """Load an artifact written by :func:`save`, in this or a fresh process."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an fxopt artifact (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{manifest_path} is corrupted: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: artifact format {manifest.get('format')!r}, this fxopt reads {FORMAT!r}")
    saved_torch, this_torch = manifest["torch"].split("+")[0], torch.__version__.split("+")[0]
    if saved_torch.split(".")[:2] != this_torch.split(".")[:2]:
        raise ArtifactError(f"{path} was saved with torch {manifest['torch']}, this is torch {torch.__version__}: "
                            "torch.export programs do not load across torch versions. Optimize the model again.")
    for rel, digest in manifest["files"].items():
        f = path / rel
        if not f.is_file() or _sha256(f) != digest:
            raise ArtifactError(f"{path}: {rel} is missing or corrupted (sha256 mismatch); the artifact cannot be "
                                "trusted. Save it again.")
    notes: list[str] = []
    status = {entry["name"]: _load_kernel(path, entry, notes) for entry in manifest["kernels"]}
    programs = []
    for spec in manifest["specializations"]:
        program = torch.export.load(path / spec["program"])
        programs.append(SavedProgram(spec["program"], spec, program, lower_for_execution(program.module())))
    return LoadedModule(manifest, programs, notes, status, path)


def _load_kernel(path: Path, entry: dict[str, Any], notes: list[str]) -> str:
    """Compile or load one saved kernel and register it; how its binary was obtained."""
    name = entry["name"]
    if name in kernel_mod.KERNELS:
        return "already loaded in this process"  # same name: same region, same source
    device = torch.device(entry["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"kernel {name} runs on CUDA, and this machine has no GPU")
    if entry.get("kind", "elementwise") == "rowwise":
        kernel = RowwiseKernel(_program_from_json(entry["program"]), device)
    elif entry.get("kind") in _TEMPLATE_KERNELS:
        kernel_cls, program_cls = _TEMPLATE_KERNELS[entry["kind"]]
        kernel = kernel_cls(program_cls.from_json(entry["program"]), device)
    else:
        kernel = FusedKernel(_region_from_json(entry["region"]), [Mode(m) for m in entry["modes"]], entry["backend"],
                             device, layout=_layout_from_json(entry.get("layout")))
    saved_source = (path / entry["source"]).read_text()
    binary, status = None, "compiled from source (no binary saved)"
    if kernel.source != saved_source:
        status = "compiled anew: this fxopt generates different source for the saved region"
        notes.append(f"{name}: this fxopt generates different source for the saved region; compiled anew")
    elif "binary" in entry:
        if entry["backend"] == "cuda":
            from .runtime.nvrtc import current_arch

            if entry.get("arch") == current_arch(device.index):
                binary, status = (path / entry["binary"]).read_bytes(), "saved binary reused"
            else:
                status = f"compiled anew: built for {entry.get('arch')}, this GPU is {current_arch(device.index)}"
                notes.append(f"{name}: built for {entry.get('arch')}, this GPU is {current_arch(device.index)}; "
                             "compiled anew from source")
        elif entry.get("platform") == _platform_key():
            binary, status = str(path / entry["binary"]), "saved binary reused"
        else:
            status = f"compiled anew: built on {entry.get('platform')}"
            notes.append(f"{name}: built on {entry.get('platform')}; compiled anew from source")
    kernel_mod.register(kernel.compile(binary))
    return status
