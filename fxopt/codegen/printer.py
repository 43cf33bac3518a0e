"""Region -> C++ (CPU) and CUDA C++ (NVRTC) source. Both print the same per-element program; they differ in the
loops around it.

Every region gets three entry points:

* ``NAME_flat``: every input is either dense with the output's strides ("full") or a single element ("scalar"),
  as recorded when the region was built; one index walks all tensors in memory order;
* ``NAME_vec`` (CUDA only): the same with 16-byte vector loads and stores, used when pointers are aligned;
* ``NAME_strided``: any broadcasting and strides; sizes and per-tensor strides (in elements) are arguments, so one
  compiled kernel serves every shape of its rank.
"""

from __future__ import annotations

import functools
import hashlib
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .region import STORAGE_CTYPES, Region, compute_ctype

HEADER_PATH = Path(__file__).parent / "include" / "fxopt_kernel.h"


@functools.lru_cache(maxsize=1)
def header_text() -> str:
    return HEADER_PATH.read_text()


class Mode(Enum):
    FULL = "full"  # dense, same strides as the output: index i
    SCALAR = "scalar"  # one element broadcast everywhere: index 0


class IndentedBuffer:
    """Source text with indentation, in the manner of Inductor's IndentedBuffer."""

    def __init__(self):
        self._lines: list[str] = []
        self._level = 0

    def line(self, text: str = "") -> None:
        self._lines.append(("  " * self._level + text) if text else "")

    def indent(self) -> "_Indent":
        return _Indent(self)

    def getvalue(self) -> str:
        return "\n".join(self._lines) + "\n"


class _Indent:
    def __init__(self, buf: IndentedBuffer):
        self.buf = buf

    def __enter__(self):
        self.buf._level += 1

    def __exit__(self, *exc):
        self.buf._level -= 1


def store(value: str, dtype: torch.dtype) -> str:
    """The C expression that stores ``value`` (in its compute type) into an element of ``dtype``."""
    if dtype == torch.float16:
        return f"fx_store_half({value})"
    if dtype == torch.bfloat16:
        return f"fx_store_bf16({value})"
    return value


def _body(buf: IndentedBuffer, region: Region, in_index: Sequence[str], out_index: Sequence[str],
          last: tuple[str, str, Sequence[str]] | None = None) -> None:
    """The per-element program: loads, statements, stores. ``*_index`` are each tensor's element index; ``last``
    (strided kernels): the element's last-dim index, that dim's size and each input's stride along it, for the
    rotated reads (NOTE [Gathering reads])."""
    for i, (dtype, idx) in enumerate(zip(region.input_dtypes, in_index)):
        buf.line(f"const {compute_ctype(dtype)} in{i} = fx_load(p_in{i}[{idx}]);")
    for i in region.rotated_inputs:
        assert last is not None, "a region with rotated reads has only a strided kernel"
        j, size, strides = last
        half = f"({size} / 2) * {strides[i]}"
        buf.line(f"const {compute_ctype(region.input_dtypes[i])} rot{i} = {j} < {size} / 2 ? "
                 f"-fx_load(p_in{i}[{in_index[i]} + {half}]) : fx_load(p_in{i}[{in_index[i]} - {half}]);")
    for s in region.stmts:
        buf.line(f"const {STORAGE_CTYPES[s.dtype]} {s.var} = {s.expr};  // {s.op}")
    for k, ((var, dtype), idx) in enumerate(zip(region.outputs, out_index)):
        buf.line(f"p_out{k}[{idx}] = {store(var, dtype)};")


def _params(region: Region, cuda: bool) -> list[str]:
    if cuda:
        ins = [f"const {STORAGE_CTYPES[d]}* FX_RESTRICT p_in{i}" for i, d in enumerate(region.input_dtypes)]
        outs = [f"{STORAGE_CTYPES[d]}* FX_RESTRICT p_out{k}" for k, (_, d) in enumerate(region.outputs)]
        into = ["const int64_t* FX_RESTRICT p_index", "int64_t index_limit"] if region.scatter_dim is not None else []
        return ins + outs + into
    return []


def _unpack_cpu(buf: IndentedBuffer, region: Region) -> None:
    """CPU kernels take ``char** data`` (inputs, then outputs): one ctypes array per call."""
    for i, d in enumerate(region.input_dtypes):
        t = STORAGE_CTYPES[d]
        buf.line(f"const {t}* FX_RESTRICT p_in{i} = reinterpret_cast<const {t}*>(data[{i}]);")
    for k, (_, d) in enumerate(region.outputs):
        t = STORAGE_CTYPES[d]
        buf.line(f"{t}* FX_RESTRICT p_out{k} = reinterpret_cast<{t}*>(data[{len(region.input_dtypes) + k}]);")


def vector_width(region: Region, modes: Sequence[Mode]) -> int:
    """Elements per thread in the vector kernel: 16 bytes of the widest full tensor, at most 8."""
    sizes = [torch.empty((), dtype=d).element_size() for d, m in zip(region.input_dtypes, modes) if m is Mode.FULL]
    sizes += [torch.empty((), dtype=d).element_size() for _, d in region.outputs]
    return max(1, min(8, 16 // max(sizes)))


def vec_bytes(region: Region, modes: Sequence[Mode]) -> int:
    """Alignment the vector kernel needs: the widest vector it loads or stores, in bytes."""
    vec = vector_width(region, modes)
    sizes = [torch.empty((), dtype=d).element_size() for d, m in zip(region.input_dtypes, modes) if m is Mode.FULL]
    sizes += [torch.empty((), dtype=d).element_size() for _, d in region.outputs]
    return vec * max(sizes)


def cpp_source(region: Region, modes: Sequence[Mode]) -> str:
    """C++ for the CPU: ``NAME_flat(char** data, int64_t n)`` and
    ``NAME_strided(char** data, const int64_t* sizes, const int64_t* strides, int64_t n)``."""
    n_in, n_t = len(region.input_dtypes), len(region.input_dtypes) + len(region.outputs)
    R = region.ndim
    buf = IndentedBuffer()
    buf.line(f"// fxopt fused kernel {region.name}: {' -> '.join(region.op_names)}")
    buf.line('extern "C" {')
    buf.line(f"void {region.name}_flat(char** data, int64_t n) {{")
    with buf.indent():
        _unpack_cpu(buf, region)
        if region.strided_only:
            buf.line("(void)n;  // rotated reads and writes into a cache need the strided loop: never called")
        else:
            buf.line("#pragma omp parallel for if (n >= 65536)")
            buf.line("for (int64_t i = 0; i < n; ++i) {")
            with buf.indent():
                _body(buf, region, ["i" if m is Mode.FULL else "0" for m in modes], ["i"] * len(region.outputs))
            buf.line("}")
    buf.line("}")
    if R >= 1:
        buf.line(f"// strides: {n_t} tensors (inputs, then outputs) x {R} dims, in elements")
        buf.line(f"void {region.name}_strided(char** data, const int64_t* sizes, const int64_t* strides, int64_t n) {{")
        with buf.indent():
            _unpack_cpu(buf, region)
            buf.line(f"const int64_t inner = sizes[{R - 1}];")
            buf.line("if (inner == 0) return;")
            buf.line("const int64_t outer = n / inner;")
            buf.line("#pragma omp parallel for if (n >= 65536)")
            buf.line("for (int64_t o = 0; o < outer; ++o) {")
            with buf.indent():
                for t in range(n_t):
                    buf.line(f"int64_t base{t} = 0;")
                buf.line("int64_t rem = o;")
                for d in range(R - 2, -1, -1):
                    buf.line(f"{{ const int64_t idx = rem % sizes[{d}]; rem /= sizes[{d}];")
                    for t in range(n_t):
                        buf.line(f"  base{t} += idx * strides[{t * R + d}];")
                    buf.line("}")
                if region.scatter_dim is not None:  # NOTE [Writes into a cache]; the caller checked the index
                    for t in range(n_in, n_t):  # every output goes into its destination at the index
                        buf.line(f"base{t} += *reinterpret_cast<const int64_t*>(data[{n_t}]) * "
                                 f"strides[{t * R + region.scatter_dim}];")
                buf.line("for (int64_t j = 0; j < inner; ++j) {")
                with buf.indent():
                    idx = [f"base{t} + j * strides[{t * R + R - 1}]" for t in range(n_t)]
                    _body(buf, region, idx[:n_in], idx[n_in:],
                          ("j", "inner", [f"strides[{t * R + R - 1}]" for t in range(n_in)]))
                buf.line("}")
            buf.line("}")
        buf.line("}")
    buf.line('}  // extern "C"')
    return header_text() + "\n" + buf.getvalue()


def cuda_source(region: Region, modes: Sequence[Mode]) -> str:
    """CUDA C++ for NVRTC: ``NAME_flat``, ``NAME_vec`` and ``NAME_strided`` (grid-stride loops; 64-bit indices, and
    32-bit ones in ``NAME_strided`` where they fit: NOTE [Strided iteration])."""
    params = ", ".join(_params(region, cuda=True))
    vec = vector_width(region, modes)
    buf = IndentedBuffer()
    buf.line(f"// fxopt fused kernel {region.name}: {' -> '.join(region.op_names)}")
    grid_loop = ("for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; "
                 "i += (int64_t)blockDim.x * gridDim.x) {")
    flat_in = ["i" if m is Mode.FULL else "0" for m in modes]
    if region.strided_only:  # NOTE [Gathering reads], NOTE [Writes into a cache]: the strided kernel alone
        return header_text() + "\n" + buf.getvalue() + _cuda_strided(region, params)

    buf.line(f'extern "C" __global__ void {region.name}_flat({params}, int64_t n) {{')
    with buf.indent():
        buf.line("FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]")
        buf.line(grid_loop)
        with buf.indent():
            _body(buf, region, flat_in, ["i"] * len(region.outputs))
        buf.line("}")
    buf.line("}")

    buf.line(f"// {vec} elements per thread: 16-byte (or narrower) loads and stores. The kernel checks its pointers'")
    buf.line("// alignment itself (a cached launch plan cannot know a later call's offsets): misaligned, it runs the")
    buf.line("// element-wise loop below for all n.")
    buf.line(f'extern "C" __global__ void {region.name}_vec({params}, int64_t n) {{')
    with buf.indent():
        buf.line("FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]")
        full = [f"p_in{i}" for i, m in enumerate(modes) if m is Mode.FULL]
        full += [f"p_out{k}" for k in range(len(region.outputs))]
        ptr_bits = " | ".join(f"reinterpret_cast<unsigned long long>({p})" for p in full)
        buf.line(f"const bool aligned = (({ptr_bits}) & {vec_bytes(region, modes) - 1}ull) == 0;")
        buf.line(f"const int64_t nv = aligned ? n / {vec} : 0;")
        buf.line("const int64_t stride = (int64_t)blockDim.x * gridDim.x;")
        buf.line("const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;")
        buf.line("for (int64_t v = tid; v < nv; v += stride) {")
        with buf.indent():
            for i, (d, m) in enumerate(zip(region.input_dtypes, modes)):
                if m is Mode.FULL:
                    t = STORAGE_CTYPES[d]
                    buf.line(f"const fx_vec<{t}, {vec}> l{i} = reinterpret_cast<const fx_vec<{t}, {vec}>*>(p_in{i})[v];")
            for k, (_, d) in enumerate(region.outputs):
                buf.line(f"fx_vec<{STORAGE_CTYPES[d]}, {vec}> s{k};")
            _vector_lanes(buf, region, vec,
                          [f"l{i}.v[k]" if m is Mode.FULL else f"p_in{i}[0]" for i, m in enumerate(modes)])
            for k, (_, d) in enumerate(region.outputs):
                t = STORAGE_CTYPES[d]
                buf.line(f"reinterpret_cast<fx_vec<{t}, {vec}>*>(p_out{k})[v] = s{k};")
        buf.line("}")
        buf.line(f"for (int64_t i = nv * {vec} + tid; i < n; i += stride) {{")
        with buf.indent():
            _body(buf, region, flat_in, ["i"] * len(region.outputs))
        buf.line("}")
    buf.line("}")

    return header_text() + "\n" + buf.getvalue() + _cuda_strided(region, params)


def strided_int_params(region: Region) -> list[str]:
    """``NAME_strided``'s integer parameters after its pointers (and a write's index and limit): n, index32, the
    sizes, their dividers, the strides of each tensor."""
    n_t = len(region.input_dtypes) + len(region.outputs)
    return (["n", "index32"] + [f"size{d}" for d in range(region.ndim)] + [f"dv{d}" for d in range(region.ndim)]
            + [f"st{t}_{d}" for t in range(n_t) for d in range(region.ndim)])


def specialized_suffix(constants: Mapping[str, int], block: object) -> str:
    """What a kernel compiled for these argument values and block adds to its name (NOTE [Kernels for one shape]
    in codegen/rowwise.py)."""
    key = ",".join(f"{k}={v}" for k, v in constants.items()) + f";{block}"
    return f"_s{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def strided_specialized_name(region: Region, constants: Mapping[str, int], threads: int) -> str:
    """The name of ``NAME_strided`` compiled for these argument values and block size."""
    return f"{region.name}_strided" + specialized_suffix(constants, threads)


def cuda_strided_source(region: Region, constants: Mapping[str, int], threads: int) -> str:
    """CUDA C++ of ``NAME_strided`` alone, compiled for one call's arguments and a block of ``threads`` (NOTE
    [Kernels for one shape] in codegen/rowwise.py): the same parameters, the given ones ignored; the index32
    branches not taken, unit dims and the divisions by constant sizes folded. Regions that write into a cache have
    none."""
    if region.scatter_dim is not None or region.ndim < 1:
        raise ValueError(f"{region.name}: no specialized strided kernel for this region")
    if unknown := set(constants) - set(strided_int_params(region)):
        raise ValueError(f"{region.name}: no such parameters {sorted(unknown)}")
    return header_text() + "\n" + _cuda_strided(region, ", ".join(_params(region, cuda=True)), constants, threads)


def _cuda_strided(region: Region, params: str, constants: Mapping[str, int] | None = None,
                  threads: int | None = None) -> str:
    """``NAME_strided``: any sizes and strides, each element's index decomposed per dim (rank >= 1 only). The host
    passes dims merged where it can (NOTE [Strided iteration]): leading size-1 dims are skipped; with ``index32``
    1 every index and offset is computed in 32-bit arithmetic, with 2 also a vector of the inner dim a thread.
    With ``constants`` and ``threads``: the kernel for exactly those (:func:`cuda_strided_source`)."""
    n_in, n_t = len(region.input_dtypes), len(region.input_dtypes) + len(region.outputs)
    R = region.ndim
    if R < 1:
        return ""
    constants = dict(constants or {})
    buf = IndentedBuffer()
    ints = ", ".join(f"int64_t {p}_given" if p in constants else f"int64_t {p}" for p in strided_int_params(region))
    name = f"{region.name}_strided" if threads is None else strided_specialized_name(region, constants, threads)
    bounds = f"__launch_bounds__({threads}) " if threads is not None else ""
    buf.line(f"// sizes, their dividers and the strides (in elements) of {n_t} tensors, inputs then outputs. index32:")
    buf.line("// every element number and offset fits 31 bits (the host checked), and dv<d> holds size<d>'s magic")
    buf.line("// multiplier (low 32 bits) and shift (the next 8): a division is a multiply-high, an add and a shift")
    buf.line(f'extern "C" __global__ void {bounds}{name}({params}, {ints}) {{')
    with buf.indent():
        buf.line("FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]")
        for p, v in constants.items():
            buf.line(f"constexpr int64_t {p} = {int(v)};")
        if threads is None:
            buf.line("const uint32_t bdx = blockDim.x;")
        else:
            buf.line(f"constexpr uint32_t bdx = {threads};")
        if region.scatter_dim is not None:  # NOTE [Writes into a cache]: an index out of range is a device fault
            buf.line("const int64_t index = p_index[0];")
            buf.line("if (index < 0 || index >= index_limit) __trap();")
        vec = strided_vector_width(region)
        if vec > 1 and not region.strided_only:
            # index32 == 2: the host found the inner dim dense or broadcast in every tensor, its size and the
            # dense tensors' other strides multiples of the vector; the pointers are checked here (a cached plan
            # cannot know a later call's offsets)
            dtypes = list(region.input_dtypes) + [d for _, d in region.outputs]
            ptrs = [f"p_in{t}" for t in range(n_in)] + [f"p_out{k}" for k in range(len(region.outputs))]
            misaligned = " | ".join(
                f"(st{t}_{R - 1} == 1 ? reinterpret_cast<unsigned long long>({p}) & "
                f"{vec * torch.empty((), dtype=d).element_size() - 1}ull : 0ull)"
                for t, (p, d) in enumerate(zip(ptrs, dtypes)))
            buf.line(f"if (index32 == 2 && ({misaligned}) == 0) {{")
            with buf.indent():
                _strided_vector_loop(buf, region, vec, n_in, n_t)
            buf.line("} else if (index32) {")
        else:
            buf.line("if (index32) {")
        with buf.indent():
            _strided_loop(buf, region, "uint32_t", n_in, n_t)
        buf.line("} else {")
        with buf.indent():
            _strided_loop(buf, region, "int64_t", n_in, n_t)
        buf.line("}")
    buf.line("}")
    return buf.getvalue()


def strided_vector_width(region: Region) -> int:
    """Elements a thread of the strided kernel's vector loop takes along the inner dim: 16 bytes of the widest
    tensor, at most 8 (NOTE [Strided iteration])."""
    sizes = [torch.empty((), dtype=d).element_size() for d in region.input_dtypes]
    sizes += [torch.empty((), dtype=d).element_size() for _, d in region.outputs]
    return max(1, min(8, 16 // max(sizes)))


def _offsets(buf: IndentedBuffer, region: Region, index_t: str, n_t: int) -> None:
    """Decompose ``rem`` (an element number) into each tensor's offset ``off<t>``: dim R-1 always, dims before it
    only where their size is not 1 (uniform branches on kernel arguments), dim 0 without a division."""
    R = region.ndim
    cast = "" if index_t == "int64_t" else f"({index_t})"
    for t in range(n_t):
        buf.line(f"{index_t} off{t} = 0;")
    if region.rotated_inputs:
        buf.line(f"{index_t} i_last = 0;")
    for d in range(R - 1, -1, -1):
        if d == 0:
            head, take = "{ ", f"const {index_t} idx = rem;"
        else:
            head = "{ " if d == R - 1 else f"if (size{d} != 1) {{ "
            if index_t == "int64_t":
                take = f"const int64_t idx = rem % size{d}; rem /= size{d};"
            else:
                take = (f"const uint32_t q = (__umulhi(rem, (uint32_t)dv{d}) + rem) >> (uint32_t)(dv{d} >> 32); "
                        f"const uint32_t idx = rem - q * (uint32_t)size{d}; rem = q;")
        buf.line(head + take)
        if d == R - 1 and region.rotated_inputs:
            buf.line("  i_last = idx;")
        for t in range(n_t):
            buf.line(f"  off{t} += idx * {cast}st{t}_{d};")
        buf.line("}")


def _vector_lanes(buf: IndentedBuffer, region: Region, vec: int, sources: Sequence[str]) -> None:
    """The per-element program over the ``vec`` lanes of a vector: input i's lane value is ``sources[i]``, output k's
    goes to ``s<k>.v[k]``."""
    buf.line("#pragma unroll")
    buf.line(f"for (int k = 0; k < {vec}; ++k) {{")
    with buf.indent():
        for i, (d, src) in enumerate(zip(region.input_dtypes, sources)):
            buf.line(f"const {compute_ctype(d)} in{i} = fx_load({src});")
        for st in region.stmts:
            buf.line(f"const {STORAGE_CTYPES[st.dtype]} {st.var} = {st.expr};  // {st.op}")
        for k, (var, d) in enumerate(region.outputs):
            buf.line(f"s{k}.v[k] = {store(var, d)};")
    buf.line("}")


def _strided_vector_loop(buf: IndentedBuffer, region: Region, vec: int, n_in: int, n_t: int) -> None:
    """``vec`` consecutive elements of the inner dim a thread: one offset decomposition per vector, 16-byte loads
    of the tensors dense along it, one load of those broadcast along it, 16-byte stores."""
    buf.line(f"const uint32_t groups = (uint32_t)n / {vec};")
    buf.line("for (uint32_t g = (uint32_t)blockIdx.x * bdx + threadIdx.x; g < groups; g += bdx * gridDim.x) {")
    with buf.indent():
        buf.line(f"uint32_t rem = g * {vec};")
        _offsets(buf, region, "uint32_t", n_t)
        R = region.ndim
        for t, d in enumerate(region.input_dtypes):
            ty = STORAGE_CTYPES[d]
            buf.line(f"fx_vec<{ty}, {vec}> l{t};")
            load = f"*reinterpret_cast<const fx_vec<{ty}, {vec}>*>(p_in{t} + off{t})"
            buf.line(f"if (st{t}_{R - 1} == 1) {{ l{t} = {load}; }}")
            buf.line(f"else {{ const {ty} b = p_in{t}[off{t}];")
            buf.line("#pragma unroll")
            buf.line(f"  for (int k = 0; k < {vec}; ++k) l{t}.v[k] = b; }}")
        for k, (_, d) in enumerate(region.outputs):
            buf.line(f"fx_vec<{STORAGE_CTYPES[d]}, {vec}> s{k};")
        _vector_lanes(buf, region, vec, [f"l{i}.v[k]" for i in range(n_in)])
        for k, (_, d) in enumerate(region.outputs):
            ty = STORAGE_CTYPES[d]
            buf.line(f"*reinterpret_cast<fx_vec<{ty}, {vec}>*>(p_out{k} + off{n_in + k}) = s{k};")
    buf.line("}")


def _strided_loop(buf: IndentedBuffer, region: Region, index_t: str, n_in: int, n_t: int) -> None:
    """The grid-stride loop of ``NAME_strided`` in ``index_t`` arithmetic, one element a thread."""
    R = region.ndim
    cast = "" if index_t == "int64_t" else f"({index_t})"
    buf.line(f"const {index_t} count = {cast}n;")
    buf.line(f"for ({index_t} i = ({index_t})blockIdx.x * bdx + threadIdx.x; i < count; "
             f"i += ({index_t})bdx * gridDim.x) {{")
    with buf.indent():
        buf.line(f"{index_t} rem = i;")
        _offsets(buf, region, index_t, n_t)
        if region.scatter_dim is not None:  # every output goes into its destination at the index
            for t in range(n_in, n_t):
                buf.line(f"off{t} += {cast}(index * st{t}_{region.scatter_dim});")
        _body(buf, region, [f"off{t}" for t in range(n_in)], [f"off{t}" for t in range(n_in, n_t)],
              ("i_last", f"size{R - 1}", [f"st{t}_{R - 1}" for t in range(n_in)]))
    buf.line("}")
