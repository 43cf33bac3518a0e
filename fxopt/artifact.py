"""Saved artifacts: ``fxopt.save(optimized, path)`` and ``fxopt.load(path)``.

An artifact is a directory::

    manifest.json          format, fxopt and torch versions, device, every file's sha256
    program_0.pt2          one torch.export program per input signature: the rewritten graph and its weights
    kernels/NAME.json      each generated kernel's program (what it computes, in fxopt's IR: an elementwise region
                           and its modes, or a row-wise program)
    kernels/NAME.cu|.cpp   its source
    kernels/NAME.cubin|.so its compiled binary, for the device it was built on

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
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .codegen.printer import Mode
from .codegen.rowwise import RowwiseKernel
from .codegen.region import Region, Stmt
from .errors import FxoptError
from .runtime import kernel as kernel_mod
from .runtime.kernel import FusedKernel
from .runtime.lower import lower_for_execution
from .runtime.streams import without_streams
from .runtime.strides import contiguous_strides

FORMAT = "fxopt-artifact/1"


class ArtifactError(FxoptError):
    """An artifact that cannot be loaded as it is: corrupted, from another torch, or of an unknown format."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in artifact")
    return value


def _region_to_json(region: Region) -> dict[str, Any]:
    return {"name": region.name, "input_dtypes": [str(d) for d in region.input_dtypes],
            "stmts": [[s.var, str(s.dtype), s.expr, s.op] for s in region.stmts],
            "outputs": [[v, str(d)] for v, d in region.outputs], "ndim": region.ndim, "op_names": region.op_names}


def _region_from_json(data: dict[str, Any]) -> Region:
    return Region(data["name"], [_dtype(d) for d in data["input_dtypes"]],
                  [Stmt(v, _dtype(d), e, op) for v, d, e, op in data["stmts"]],
                  [(v, _dtype(d)) for v, d in data["outputs"]], data["ndim"], list(data["op_names"]))


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
            return _dtype(obj["dtype"])
        if isinstance(obj, dict):
            cls = types.get(obj.get("type"))
            if cls is None:
                raise ArtifactError(f"unknown row-wise program part {obj.get('type')!r} in artifact")
            fields = {k: decode(v) for k, v in obj.items() if k != "type"}
            if cls is rowwise.RowStmt:
                fields["deps"] = tuple(fields["deps"])
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
    """Write ``optimized`` (an :class:`~fxopt.OptimizedModule`) to the directory ``path`` (replaced if present)."""
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
                                "specializations": [], "kernels": []}
    saved_kernels: set[str] = set()
    for i, spec in enumerate(specs):
        inputs = spec.example_inputs
        # side-stream branches (parallel_branches) are dropped: an exported program holds no streams or events
        program = torch.export.export(without_streams(spec.graph_module), tuple(inputs), strict=False)
        name = f"program_{i}.pt2"
        torch.export.save(program, tmp / name)
        manifest["specializations"].append({"program": name, "signature": _signature_json(inputs),
                                            "backend": spec.backend})
        for k in spec.kernels.values():
            if k.name in saved_kernels:
                continue
            if not isinstance(k, (FusedKernel, RowwiseKernel)):
                raise ArtifactError(f"kernel {k.name} ({type(k).__name__}, {getattr(k, 'backend', '?')}) cannot be "
                                    f"saved: only fxopt's generated kernels can (Inductor's and registered user "
                                    f"kernels cannot); optimize with backend='auto', 'cuda' or 'cpp' to save")
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


def _save_kernel(k: FusedKernel | RowwiseKernel, folder: Path) -> dict[str, Any]:
    suffix = ".cu" if k.backend == "cuda" else ".cpp"
    (folder / f"{k.name}{suffix}").write_text(k.source)
    entry: dict[str, Any] = {"name": k.name, "backend": k.backend, "device": str(k.device),
                             "source": f"kernels/{k.name}{suffix}"}
    if isinstance(k, RowwiseKernel):
        entry.update(kind="rowwise", program=_program_to_json(k.program))
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


class LoadedModule(torch.nn.Module):
    """What :func:`load` returns: runs the saved optimized graphs, one per saved input signature."""

    def __init__(self, manifest: dict[str, Any], programs: dict[tuple, Any], notes: list[str]):
        super().__init__()
        self.manifest = manifest
        self.notes = notes  # e.g. kernels recompiled because the GPU differs
        self._programs = programs  # signature -> (ExportedProgram, runner)

    def forward(self, *args: Any) -> Any:
        from .api import input_signature

        entry = self._programs.get(input_signature(args))
        if entry is None:
            saved = "; ".join(str(s["signature"]) for s in self.manifest["specializations"])
            got = _signature_json([a for a in args if isinstance(a, torch.Tensor)])
            raise ValueError(f"this fxopt artifact holds optimized graphs for the inputs {saved}; got {got}. "
                             "Optimize the model again for these inputs (fxopt.optimize) and save it.")
        return entry[1].forward(*args)

    def program(self, index: int = 0):
        """The torch.export program of the index-th saved signature."""
        return list(self._programs.values())[index][0]


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
    for entry in manifest["kernels"]:
        _load_kernel(path, entry, notes)
    programs = {}
    from .api import input_signature

    for spec in manifest["specializations"]:
        program = torch.export.load(path / spec["program"])
        runner = lower_for_execution(program.module())
        example = [torch.empty_strided(s["shape"], s.get("stride") or contiguous_strides(s["shape"]),
                                       dtype=_dtype(s["dtype"]), device=s["device"]) for s in spec["signature"]]
        programs[input_signature(example)] = (program, runner)
    return LoadedModule(manifest, programs, notes)


def _load_kernel(path: Path, entry: dict[str, Any], notes: list[str]) -> None:
    name = entry["name"]
    if name in kernel_mod.KERNELS:
        return  # already loaded in this process (same name: same region, same source)
    device = torch.device(entry["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"kernel {name} runs on CUDA, and this machine has no GPU")
    if entry.get("kind", "elementwise") == "rowwise":
        kernel = RowwiseKernel(_program_from_json(entry["program"]), device)
    else:
        kernel = FusedKernel(_region_from_json(entry["region"]), [Mode(m) for m in entry["modes"]], entry["backend"],
                             device, layout=_layout_from_json(entry.get("layout")))
    saved_source = (path / entry["source"]).read_text()
    binary = None
    if kernel.source != saved_source:
        notes.append(f"{name}: this fxopt generates different source for the saved region; compiled anew")
    elif "binary" in entry:
        if entry["backend"] == "cuda":
            from .runtime.nvrtc import current_arch

            if entry.get("arch") == current_arch(device.index):
                binary = (path / entry["binary"]).read_bytes()
            else:
                notes.append(f"{name}: built for {entry.get('arch')}, this GPU is {current_arch(device.index)}; "
                             "compiled anew from source")
        elif entry.get("platform") == _platform_key():
            binary = str(path / entry["binary"])
        else:
            notes.append(f"{name}: built on {entry.get('platform')}; compiled anew from source")
    kernel_mod.register(kernel.compile(binary))
