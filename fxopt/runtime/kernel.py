"""The fused-kernel op the rewritten graph calls, and the compiled kernels behind it.

A fused region appears in the graph as one node::

    fused = torch.ops.fxopt.fused.default('fxopt_relu_sigmoid_1a2b3c4d', [x])
    getitem = fused[0]

``fxopt::fused`` is a torch.library custom op, so dispatch counting, torch.export and torch.compile see one op.
Its implementation looks the kernel up by name in :data:`KERNELS` and launches it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..codegen.printer import (Mode, cpp_source, cuda_source, cuda_strided_source, strided_int_params,
                               strided_specialized_name, strided_vector_width, vector_width)
from ..codegen.region import Region
from . import native
from .strides import (coalesce, contiguous_strides, divider32, fits_index32, is_non_overlapping_and_dense, replay,
                      vector_inner)

log = logging.getLogger(__name__)

KERNELS: dict[str, "FusedKernel"] = {}
_lock = threading.Lock()

_THREADS = 256


# NOTE [Kernels for one shape] (codegen/rowwise.py): a CUDA kernel's first SPECIALIZED_SHAPES shapes (with their
# strides) each get a kernel compiled for exactly them, the row kernels and the strided elementwise ones; later
# shapes run the generic kernel. One generic kernel serves every block of a network that has its program
# (EfficientNet-B0's 16 squeezes, at 10 shapes), and a module is optimized again for each new input signature (up
# to ``max_specializations``, 8 by default), so the limit bounds compiling for shapes that keep changing, not a
# network's own. FXOPT_SPECIALIZE=0 turns it off; FXOPT_SPECIALIZE_STRIDED=0 turns off only the strided elementwise
# kernels' (ConvNeXt's bias + GELU over 1 x 56 x 56 x 384, fp16: 3.58 µs generic, 2.94 specialized, Inductor 2.85;
# its layer scale + residual 2.05 -> 1.50, Inductor 1.34; H100, reports/2026-12-06-h100-s9-b02a0d4).
SPECIALIZED_SHAPES = 32
SPECIALIZE = os.environ.get("FXOPT_SPECIALIZE", "1") != "0"
SPECIALIZE_STRIDED = os.environ.get("FXOPT_SPECIALIZE_STRIDED", "1") != "0"


def specialized_launcher(kernel: "GeneratedKernel", key: Any, build: Callable[[], tuple[str, str]],
                         arg_types: Sequence[str]) -> Any:
    """The launcher of ``kernel`` compiled for one call's arguments (NOTE [Kernels for one shape]): ``build()``
    gives its (source, function name); kept in ``kernel._specializations`` under ``key``. None: turned off, past
    SPECIALIZED_SHAPES shapes, or a compile error (logged; the generic kernel computes the same)."""
    from . import driver, nvrtc

    cache = kernel._specializations
    if not SPECIALIZE:
        return None
    if key not in cache:
        if len(cache) >= SPECIALIZED_SHAPES:
            return None
        if not nvrtc.nvrtc_available()[0]:  # a loaded artifact's generic binaries run without NVRTC: nothing to say
            return None
        try:
            source, name = build()
            module, _ = driver.load_cuda(source, device_index=kernel.device.index, name_hint=name)
            cache[key] = module.function(name).launcher(list(arg_types))
        except Exception as e:  # noqa: BLE001 -- keep the generic kernel and say why
            log.warning("%s: no kernel for shape %s (%s: %s); the generic kernel runs", kernel.name, key,
                        type(e).__name__, e)
            cache[key] = None
    return cache[key]


# NOTE [Grids for the work]: a thread of the vector loops takes ``vector`` elements (the flat "vec" path, and the
# strided kernel's vector loop along a dense inner dim, index32 == 2: NOTE [Strided iteration]), so the grid covers
# numel / vector threads; sized for numel, 7 of 8 blocks of a float16 kernel started, found nothing to do and exited,
# a wave of empty blocks on every call of a latency-bound batch-1 kernel (ConvNeXt-T's bias + GELU, scale +
# residual: 2.6 and 2.2 µs a call against Triton's 1.6 and 1.3, H100, reports/2026-12-06-h100-s7-92b51af). Every
# loop is grid-stride, so any grid computes every element (the strided kernel's scalar fallback for misaligned
# pointers too, with more elements a thread); at most 16 blocks an SM.
def launch_grid(numel: int, vector: int, sm_count: int) -> int:
    """Blocks of _THREADS threads for ``numel`` elements taken ``vector`` at a time (NOTE [Grids for the work])."""
    work = (numel + vector - 1) // vector
    return max(1, min((work + _THREADS - 1) // _THREADS, sm_count * 16))


def _raw_stream(device_index: int) -> int:
    # torch's own accessor for the current stream's handle (what Inductor's generated code uses); avoids building
    # a torch.cuda.Stream object on every launch.
    return torch._C._cuda_getCurrentRawStream(device_index)


@dataclass
class _Plan:
    """How to run the kernel for one set of input shapes and strides: computed once, reused every call."""

    out_shape: torch.Size
    out_stride: tuple[int, ...]
    numel: int
    path: str  # "vec" | "flat" | "strided"
    extra: tuple  # sizes and strides for the strided path
    grid: int
    launch: Callable[..., None] | None = None  # launch(stream, *input and output pointers, *args)
    args: tuple = ()  # what follows the pointers in ``launch``'s arguments
    # per thread id: driver.Launcher.prepared() (the generated call packs and launches itself), () when it cannot
    inline: dict = field(default_factory=dict)
    prepare: Callable[[], tuple] | None = None  # fills ``inline`` for the calling thread
    native: tuple | None = None  # native.plan_args(...) for the compiled call path; None: Python path only


def _same_order(a: Sequence[int], b: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether two dense layouts put the elements in the same order: equal strides, except on size-1 dimensions,
    whose stride addresses nothing."""
    return all(x == y or n == 1 for x, y, n in zip(a, b, shape))


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in some dimension order (contiguous, channels_last, transposed, permuted): then
    empty_like keeps its strides, as eager's TensorIterator does for its output, and its elements fill
    ``numel * element_size`` bytes from ``data_ptr()`` (what graph_io's byte copies rely on)."""
    return is_non_overlapping_and_dense(t.shape, t.stride())


class GeneratedKernel:
    """What the generated kernels behind ``fxopt::fused`` share (:class:`FusedKernel`, and
    :class:`fxopt.runtime.rowwise.RowwiseKernel`), and the contract :func:`generate_call`, :func:`check_inputs`,
    the artifact and the CUDA-graph runner rely on. A subclass sets ``name``, ``backend`` ("cuda" or "cpp"),
    ``device`` (see :meth:`resolve_device`), ``input_dtypes``, ``output_dtypes``, ``op_names``, ``source`` and
    ``_plans`` (key -> plan), and defines ``compile(binary)`` (which sets ``_binary``) and ``_plan(inputs, key)``,
    whose plans have ``launch``, ``args``, ``inline``, ``prepare``, ``numel`` and ``native`` (and ``fixes`` when
    ``call_fixes``). A CUDA kernel compiled for its plans' shapes too keeps them in ``_specializations``
    (:func:`specialized_launcher`)."""

    # how the generated call path allocates output k, and whether plans carry per-input copies (``fixes``)
    call_alloc = "empty_strided(plan.out_shape, plan.out_stride, dtype=D{k}, device=device)"
    call_fixes = False

    @staticmethod
    def resolve_device(device: torch.device) -> torch.device:
        """A CUDA device with its index (the current device's when it has none)."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def __deepcopy__(self, memo) -> "GeneratedKernel":
        return self  # compiled and immutable: graph snapshots share it

    @property
    def binary(self) -> bytes | str | None:
        """What :meth:`compile` produced: the cubin, or the shared library's path; None before compiling."""
        return getattr(self, "_binary", None)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.call(inputs)

    @functools.cached_property
    def call(self) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
        """The per-call path as one generated function (what the lowered graph calls; NOTE [Fused call path])."""
        return generate_call(self, alloc=self.call_alloc, fixes=self.call_fixes)


class FusedKernel(GeneratedKernel):
    """One generated kernel: its region, source, compiled entry points, and the launch path.

    ``modes`` says, per input, what the flat kernels were specialized for (full-size dense or one element); a call
    whose inputs fit takes the flat (or vector) path, anything else the strided one.
    """

    def __init__(self, region: Region, modes: Sequence[Mode], backend: str, device: torch.device,
                 layout: Any = None):
        self.region = region
        # The group's ops as eager runs them (runtime/strides.py LayoutProgram), for the strides eager gives the
        # outputs (NOTE [Output layout]); None: the fallback rule in _eager_stride.
        self.layout = layout
        self.modes = list(modes)
        # The registry name covers what the compiled code depends on besides the region: the backend (a CPU build
        # must never serve CUDA tensors) and which inputs the flat path reads as one element.
        scalars = "".join("s" if m is Mode.SCALAR else "f" for m in self.modes)
        self.name = f"{region.name}_{backend}" + (f"_{scalars}" if "s" in scalars else "")
        self.backend = backend
        self.device = self.resolve_device(device)
        self.input_dtypes = tuple(region.input_dtypes)
        self.output_dtypes = tuple(d for _, d in region.outputs)
        self.ndim = region.ndim
        self.op_names = list(region.op_names)
        self.vec = vector_width(region, modes)
        self.source = cuda_source(region, modes) if backend == "cuda" else cpp_source(region, modes)
        self._plans: dict[Any, _Plan] = {}
        self._specializations: dict[Any, Any] = {}  # NOTE [Kernels for one shape]
        self._bind: Callable[[_Plan], tuple[Callable[..., None], tuple]] | None = None

    # -- compilation -------------------------------------------------------------------------------------------
    def compile(self, binary: bytes | str | None = None) -> "FusedKernel":
        """Compile and load now (raises CompileError with the compiler log). ``binary``: a cubin (CUDA) or the path
        of a shared library (C++) already built from exactly this source, e.g. from a saved artifact."""
        if self.backend == "cuda":
            self._compile_cuda(binary)
        else:
            self._compile_cpp(binary)
        return self

    def _compile_cpp(self, library_path: str | None = None) -> None:
        from .cc import load_library

        lib = load_library(self.source, name_hint=self.name, path=library_path)
        self._binary = lib._name
        symbol = self.region.name  # the generated functions are named after the region
        flat = getattr(lib, f"{symbol}_flat")
        flat.argtypes, flat.restype = [ctypes.c_void_p, ctypes.c_int64], None
        strided = None
        if self.ndim >= 1:
            strided = getattr(lib, f"{symbol}_strided")
            strided.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            strided.restype = None
        n_ptrs = len(self.input_dtypes) + len(self.output_dtypes)
        ptr_array = ctypes.c_void_p * n_ptrs
        i64_array = ctypes.c_int64 * max(1, self.ndim * (n_ptrs + 1))
        if self.region.scatter_dim is not None:  # NOTE [Writes into a cache]: the index's pointer after the outputs
            into_ptrs, into_i64 = ctypes.c_void_p * (n_ptrs + 1), ctypes.c_int64 * max(1, self.ndim * n_ptrs)
            self._launch_into = lambda ptrs, sizes, strides, n: strided(into_ptrs(*ptrs), into_i64(*sizes),
                                                                         into_i64(*strides), n)

        def bind(plan: _Plan) -> tuple[Callable[..., None], tuple]:
            outs = [plan.out_shape] * len(self.output_dtypes), [plan.out_stride] * len(self.output_dtypes)
            if plan.path == "strided":
                plan.native = native.plan_args(*outs, native.CPU_STRIDED if plan.numel else native.NONE,
                                               native.address(strided), tail=(plan.numel,), sizes=plan.extra[0],
                                               strides=plan.extra[1])
                sizes, strides = (i64_array(*v) for v in plan.extra)
                return (lambda _stream, *ptrs: strided(ptr_array(*ptrs), sizes, strides, plan.numel)), ()
            plan.native = native.plan_args(*outs, native.CPU_FLAT if plan.numel else native.NONE, native.address(flat),
                                           tail=(plan.numel,))
            return (lambda _stream, *ptrs: flat(ptr_array(*ptrs), plan.numel)), ()

        self._bind = bind

    def _compile_cuda(self, cubin: bytes | None = None) -> None:
        from . import driver

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        module, self._binary = driver.load_cuda(self.source, device_index=index, name_hint=self.name, cubin=cubin)
        n_ptrs = len(self.input_dtypes) + len(self.output_dtypes)
        flat_types = ["ptr"] * n_ptrs + ["i64"]
        symbol = self.region.name  # the generated functions are named after the region
        # a region with rotated reads or a write into a cache has only the strided kernel
        flat_only = not self.region.strided_only
        launch_flat = module.function(f"{symbol}_flat").launcher(flat_types) if flat_only else None
        launch_vec = module.function(f"{symbol}_vec").launcher(flat_types) if flat_only else None
        if self.region.scatter_dim is not None:  # NOTE [Writes into a cache]: index pointer and limit before n
            launch = module.function(f"{symbol}_strided").launcher(
                ["ptr"] * n_ptrs + ["ptr", "i64", "i64", "i64"] + ["i64"] * (self.ndim * (n_ptrs + 2)))
            self._launch_into = lambda ptrs, sizes, strides, n, limit, grid: launch(
                grid, _THREADS, _raw_stream(index), *ptrs, limit, n, *sizes, *strides)
        launch_strided = None
        strided_types = flat_types + ["i64"] * (1 + self.ndim * (n_ptrs + 2))  # n, index32, sizes, dividers, strides
        if self.ndim >= 1:
            launch_strided = module.function(f"{symbol}_strided").launcher(strided_types)
        launchers = {"flat": launch_flat, "vec": launch_vec, "strided": launch_strided}

        def specialized(plan: _Plan) -> Any:  # NOTE [Kernels for one shape]
            if (not SPECIALIZE_STRIDED or plan.path != "strided" or not plan.numel
                    or self.region.scatter_dim is not None):
                return None

            def build() -> tuple[str, str]:
                constants = dict(zip(strided_int_params(self.region), (plan.numel, *plan.extra), strict=True))
                return (cuda_strided_source(self.region, constants, _THREADS),
                        strided_specialized_name(self.region, constants, _THREADS))

            return specialized_launcher(self, (plan.numel, plan.extra), build, strided_types)

        def bind(plan: _Plan) -> tuple[Callable[..., None], tuple]:
            launcher = specialized(plan) or launchers[plan.path]
            plan.prepare = inline_preparer(plan, launcher, plan.grid, _THREADS)
            args = (plan.numel, *plan.extra)
            outs = [plan.out_shape] * len(self.output_dtypes), [plan.out_stride] * len(self.output_dtypes)
            spec = launcher.native(plan.grid, _THREADS)
            if not plan.numel:
                plan.native = native.plan_args(*outs, native.NONE)
            elif spec is not None:
                plan.native = native.plan_args(*outs, native.CUDA, *spec, tail=args)
            return launcher.bind(plan.grid, _THREADS), args

        self._sm_count = driver.sm_count(index)
        self._bind = bind

    # -- calls -------------------------------------------------------------------------------------------------
    def _plan(self, inputs: Sequence[torch.Tensor], key) -> _Plan:
        if self.region.scatter_dim is not None:
            raise TypeError(f"{self.name} writes into a cache tensor: call it through fxopt::fused_into (call_into)")
        check_inputs(self, inputs)
        if self._bind is None:
            self.compile()
        shape = torch.broadcast_shapes(*[t.shape for t in inputs])
        if len(shape) != self.ndim:
            raise ValueError(f"{self.name}: inputs broadcast to rank {len(shape)}, the kernel was built for rank "
                             f"{self.ndim}")
        numel = shape.numel()
        out_stride = self._eager_stride(inputs, shape)
        path = self._flat_path(inputs, shape, out_stride)
        extra: tuple = ()
        vector = self.vec if path == "vec" else 1  # elements a thread takes (NOTE [Grids for the work])
        if path == "strided":
            extra, vector = self.strided_args(inputs, shape, out_stride, cuda=self.backend == "cuda")
        grid = launch_grid(numel, vector, getattr(self, "_sm_count", 1))
        plan = _Plan(shape, tuple(out_stride), numel, path, extra, grid)
        plan.launch, plan.args = self._bind(plan)
        self._plans[key] = plan
        return plan

    def strided_args(self, inputs: Sequence[torch.Tensor], shape: torch.Size, out_stride: Sequence[int],
                     cuda: bool) -> tuple[tuple, int]:
        """The strided kernel's arguments after ``n`` for these inputs, and the elements a thread takes. C++:
        (sizes, strides); CUDA: index32, the sizes, their dividers, the strides (NOTE [Strided iteration])."""
        per_tensor = [t.expand(shape).stride() for t in inputs] + [tuple(out_stride)] * len(self.output_dtypes)
        sizes = tuple(shape)
        if not self.region.strided_only:  # NOTE [Strided iteration]; rotated reads need the real last dim
            sizes, per_tensor = coalesce(shape, per_tensor, out_stride)
        strides = tuple(s for st in per_tensor for s in st)
        if not cuda:
            return (sizes, strides), 1
        index32, vector = int(fits_index32(sizes, per_tensor)), 1
        if index32 and not self.region.strided_only and vector_inner(
                sizes, per_tensor, len(self.output_dtypes), strided_vector_width(self.region)):
            index32 = 2  # the vector loop along the inner dim
            vector = strided_vector_width(self.region)
        dividers = tuple(divider32(s) if index32 and s else 0 for s in sizes)
        return (index32,) + sizes + dividers + strides, vector

    def _eager_stride(self, inputs: Sequence[torch.Tensor], shape: torch.Size) -> tuple[int, ...]:
        """NOTE [Output layout]: the outputs get the strides eager gives them, because later ops can depend on them
        (a ``.view`` that only a contiguous tensor allows, the layout ``torch.stack`` picks). Eager decides op by op
        through TensorIterator's rules, which "follow the full-size dense input" does not reproduce: a broadcast
        buffer minus a channels_last input, then abs, is contiguous in eager (fuzz seed 9900997, where a later view
        then failed). So the group's ops are replayed on these inputs' sizes and strides (runtime/strides.py).
        Without a layout program, or when the outputs disagree: that fallback rule."""
        if self.layout is not None:
            try:
                strides = set(replay(self.layout, [(tuple(t.shape), tuple(t.stride())) for t in inputs]))
                if len(strides) == 1:
                    return strides.pop()
            except Exception as e:  # noqa: BLE001 -- only the exact layout is lost, the fallback rule stays
                log.debug("%s: replaying the output layout failed: %s", self.name, e)
        like = next((t for t in inputs if t.shape == shape and is_dense(t)), None)
        return like.stride() if like is not None else contiguous_strides(shape)

    def _flat_path(self, inputs, shape, out_stride) -> str:
        if self.region.rotated_inputs:
            if shape[-1] % 2:
                raise ValueError(f"{self.name}: rotate_half needs an even last dim, the inputs give {tuple(shape)}")
            return "strided"  # NOTE [Gathering reads]
        for t, mode in zip(inputs, self.modes):
            if mode is Mode.SCALAR:
                if t.numel() != 1:
                    return "strided"
            elif t.shape != shape or not _same_order(t.stride(), out_stride, shape) or not is_dense(t):
                return "strided"
        if self.ndim == 0:
            return "flat"
        if self.backend == "cuda" and self.vec > 1:
            return "vec"  # the vector kernel checks every call's pointer alignment itself
        return "flat"


    def call_into(self, inputs: Sequence[torch.Tensor], dests: Sequence[torch.Tensor], index: torch.Tensor) -> None:
        """NOTE [Writes into a cache] (passes/cache_writes.py): compute the region's outputs and write output k into
        ``dests[k]`` at ``index`` (one int64 element, on the kernel's device) along ``region.scatter_dim``, as
        ``dests[k].index_copy_(dim, index, output_k)`` would; checked before launch. On the CPU the index is read
        and range-checked on the host; on CUDA the kernel checks it (a device fault, as eager's device assert)."""
        dim = self.region.scatter_dim
        check_inputs(self, inputs)
        if self._bind is None:
            self.compile()
        if len(dests) != len(self.output_dtypes):
            raise ValueError(f"{self.name}: {len(dests)} destinations for {len(self.output_dtypes)} outputs")
        shape = torch.broadcast_shapes(*[t.shape for t in inputs])
        for k, (dest, dtype) in enumerate(zip(dests, self.output_dtypes)):
            if len(shape) != self.ndim or dest.dim() != self.ndim:
                raise ValueError(f"{self.name}: inputs broadcast to {tuple(shape)}, destination {k} "
                                 f"{tuple(dest.shape)}; the kernel was built for rank {self.ndim}")
            if shape[dim] != 1 or any(a != b for d, (a, b) in enumerate(zip(shape, dest.shape)) if d != dim) \
                    or dest.shape[dim] != dests[0].shape[dim]:
                raise ValueError(f"{self.name}: a value of shape {tuple(shape)} does not fit destination {k} "
                                 f"{tuple(dest.shape)} at one index of dim {dim}")
            if dest.dtype != dtype or dest.device != self.device:
                raise TypeError(f"{self.name}: destination {k} {dest.dtype} on {dest.device}, the kernel writes "
                                f"{dtype} on {self.device}")
        if index.numel() != 1 or index.dtype != torch.int64 or index.device != self.device:
            raise TypeError(f"{self.name}: the index must be one int64 element on {self.device}, got "
                            f"{index.dtype}{list(index.shape)} on {index.device}")
        numel = shape.numel()
        if not numel:
            return
        per_tensor = [t.expand(shape).stride() for t in inputs] + [d.stride() for d in dests]
        strides = [s for st in per_tensor for s in st]
        ptrs = [t.data_ptr() for t in inputs] + [d.data_ptr() for d in dests] + [index.data_ptr()]
        limit = dests[0].shape[dim]
        if self.backend == "cuda":
            grid = launch_grid(numel, 1, getattr(self, "_sm_count", 1))
            sizes = into_sizes(tuple(shape), tuple(map(tuple, per_tensor)),
                               tuple((tuple(d.shape), tuple(d.stride())) for d in dests))
            self._launch_into(ptrs, sizes, strides, numel, limit, grid)
        else:
            i = int(index.reshape(()))
            if not 0 <= i < limit:
                raise IndexError(f"{self.name}: index {i} is out of range for dim {dim} of size {limit}")
            self._launch_into(ptrs, tuple(shape), strides, numel)


@functools.lru_cache(maxsize=256)
def into_sizes(shape: tuple[int, ...], per_tensor: tuple[tuple[int, ...], ...],
               dests: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]) -> tuple[int, ...]:
    """The size arguments of a write into caches (NOTE [Writes into a cache]): ``index32``, the sizes, their
    dividers (NOTE [Strided iteration]); once per layout, not on every call. 32-bit offsets only where every element
    of every destination is in reach, since the index moves along its dim."""
    index32 = fits_index32(shape, per_tensor) and all(fits_index32(s, [st]) for s, st in dests)
    return (int(index32),) + shape + tuple(divider32(s) if index32 and s else 0 for s in shape)


# NOTE [Fused call path]: a fused launch should cost the host less than one eager op (~7-10 µs on the lent H200s,
# most of it the driver's launch), so the Python around cuLaunchKernel is generated per kernel, for its number of
# inputs and outputs: no loops, no list building, the plan found by one dict lookup on a flat key, and the launch
# done inline: one struct.pack_into into the calling thread's argument storage (driver.Launcher.prepared, NOTE
# [Launcher threads]) and one trampoline call. Per call: key, lookup, allocate the outputs, pack, launch. Measured
# at 0.80-1.17x of one eager op across machines (benchmarks/NOTES.md): the ctypes driver call and the Python-side
# allocation are what is left, and the compiled call path (runtime/native.py, NOTE [Native call path]) takes both
# over once it is built: ``call`` then hands every call to ``native``, which falls back to ``slow`` (this same
# path, without that first line) for any input it has no plan for.
_CALL_TEMPLATE = """
def {name}(inputs):{native}
    try:
        {unpack} = inputs
        key = ({key},)
    except Exception:
        check_inputs(kernel, inputs)  # the clear error: count, type
        raise
    plan = plans_get(key)
    if plan is None:
        plan = make_plan(inputs, key)
{fix}{alloc}
{launch}
    return [{outs}]
"""
_LAUNCH_CUDA = """    inline = plan.inline.get(get_ident())
    if inline is None:
        inline = plan.prepare()
    if inline:
        pack, storage, offset, config, tramp, address = inline
        pack(storage, offset, *config, {stream}, {ptrs}, *plan.args)
        if tramp(address):
            plan.launch({stream}, {ptrs}, *plan.args)  # raises the driver's error (or retries a missing context)
    elif plan.numel:
        plan.launch({stream}, {ptrs}, *plan.args)"""
_LAUNCH_CPU = """    if plan.numel:
        plan.launch(0, {ptrs}, *plan.args)"""


def inline_preparer(plan, launcher, grid, block) -> Callable[[], tuple]:
    """``plan.prepare``: the calling thread's inline launch tuple (driver.Launcher.prepared), remembered in
    ``plan.inline``; () where nothing launches (no elements) or there is no trampoline."""

    def prepare() -> tuple:
        got = launcher.prepared(grid, block) if plan.numel else ()
        plan.inline[threading.get_ident()] = got
        return got

    return prepare


_FIX_TEMPLATE = """    if plan.fixes is not None:  # inputs the kernel cannot address as they are get a copy per call
        {unpack} = [t if f is None else f(t) for t, f in zip(inputs, plan.fixes)]
"""


def generate_call(kernel: GeneratedKernel, *, alloc: str = GeneratedKernel.call_alloc,
                  fixes: bool = False) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """The call path of a generated kernel (NOTE [Fused call path]; ``kernel`` keeps the :class:`GeneratedKernel`
    contract); ``alloc`` allocates output k, ``fixes``: plans may copy inputs first. The native call path is attached
    when it is built (``attach_native``)."""
    xs = [f"x{i}" for i in range(len(kernel.input_dtypes))]
    os_ = [f"o{k}" for k in range(len(kernel.output_dtypes))]
    index = kernel.device.index if kernel.device.index is not None else 0
    unpack = ", ".join(xs) + ("," if len(xs) == 1 else "")
    fields = dict(
        unpack=unpack,
        key=", ".join(f"{x}.shape, {x}.stride(), {x}.dtype, {x}.get_device()" for x in xs),
        fix=_FIX_TEMPLATE.format(unpack=unpack) if fixes else "",
        alloc="\n".join(f"    {o} = " + alloc.format(k=k) for k, o in enumerate(os_)),
        launch=(_LAUNCH_CUDA if kernel.backend == "cuda" else _LAUNCH_CPU).format(
            stream=f"raw_stream({index})", ptrs=", ".join(f"{t}.data_ptr()" for t in xs + os_)),
        outs=", ".join(os_))
    src = (_CALL_TEMPLATE.format(name="call", native="\n    if native is not None:\n        return native(inputs)",
                                 **fields)
           + _CALL_TEMPLATE.format(name="slow", native="", **fields))
    lock = threading.Lock()

    def make_plan(inputs, key):
        with lock:  # against attach_native registering the plans made so far
            plan = kernel._plan(inputs, key)
            if scope["native"] is not None:
                _add_native_plan(scope["native"], key, plan)
        return plan

    def attach_native(module) -> None:
        call = module.kernel(kernel.name, scope["slow"], len(kernel.input_dtypes), list(kernel.output_dtypes),
                             kernel.device,
                             torch._C._cuda_getCurrentRawStream if kernel.backend == "cuda" else None, index,
                             torch.Tensor, torch.nn.Parameter)
        with lock:
            for key, plan in list(kernel._plans.items()):
                _add_native_plan(call, key, plan)
            scope["native"] = call

    scope = {"kernel": kernel, "check_inputs": check_inputs, "plans_get": kernel._plans.get,
             "make_plan": make_plan, "empty_strided": torch.empty_strided, "empty": torch.empty,
             "device": kernel.device, "raw_stream": _raw_stream, "get_ident": threading.get_ident, "native": None,
             **{f"D{k}": d for k, d in enumerate(kernel.output_dtypes)}}
    exec(compile(src, f"<fxopt kernel {kernel.name}>", "exec"), scope)
    fn = scope["call"]
    fn.__name__ = fn.__qualname__ = kernel.name
    fn.__module__ = "fxopt.kernels"
    fn.source = src
    fn.native = lambda: scope["native"]  # the attached native call, or None
    fn.attach_native = attach_native
    native.start()
    native.when_ready(attach_native)
    return fn


def _add_native_plan(call, key, plan) -> None:
    if plan.native is not None and getattr(plan, "fixes", None) is None:
        native.module().add_plan(call, key, *plan.native)


def check_inputs(kernel, inputs: Sequence[torch.Tensor]) -> None:
    """Inputs a kernel was not built for (count, dtype, device) are refused before anything launches. For every
    generated kernel: ``kernel`` has ``name``, ``input_dtypes`` and ``device``."""
    if len(inputs) != len(kernel.input_dtypes):
        raise ValueError(f"{kernel.name}: expected {len(kernel.input_dtypes)} inputs, got {len(inputs)}")
    for i, (t, d) in enumerate(zip(inputs, kernel.input_dtypes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{kernel.name}: input {i} is {type(t).__name__}, expected a tensor")
        if t.dtype != d:
            raise TypeError(f"{kernel.name}: input {i} has dtype {t.dtype}, the kernel was built for {d}")
        if t.device != kernel.device:
            raise RuntimeError(f"{kernel.name}: input {i} is on {t.device}, the kernel runs on {kernel.device}")


def register(kernel: FusedKernel) -> FusedKernel:
    """Make a kernel callable from graphs by name; the same region (same name) reuses the first kernel."""
    with _lock:
        return KERNELS.setdefault(kernel.name, kernel)


# -- the custom op ----------------------------------------------------------------------------------------------
_lib = torch.library.Library("fxopt", "DEF")
_lib.define("fused(str kernel, Tensor[] inputs) -> Tensor[]")


def lookup(name: str) -> Any:
    """The kernel registered under ``name`` (generated, user or Inductor); a clear error when this process has not
    loaded it."""
    kernel = KERNELS.get(name)
    if kernel is None:
        raise RuntimeError(f"fxopt kernel {name!r} is not loaded in this process; load the optimized module with "
                           f"fxopt.load(), or optimize the model again")
    return kernel


def _fused_impl(kernel: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return lookup(kernel)(inputs)


_lib.impl("fused", _fused_impl, "CPU")
_lib.impl("fused", _fused_impl, "CUDA")


@torch.library.register_fake("fxopt::fused")
def _fused_fake(kernel: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    k = lookup(kernel)
    if hasattr(k, "fake"):  # user and Inductor kernels describe their own outputs
        return k.fake(inputs)
    shape = torch.broadcast_shapes(*[t.shape for t in inputs])
    return [inputs[0].new_empty(shape, dtype=d) for d in k.output_dtypes]


fused_op = torch.ops.fxopt.fused.default

# NOTE [Writes into a cache]: a kernel whose outputs go into destination tensors at one device-side index
# (passes/cache_writes.py), in place of ``dest.index_copy_(dim, index, fused(...)[0])`` (and of the copies into
# other caches at the same index that joined it: a decoder's key and value).
_lib.define("fused_into(str kernel, Tensor[] inputs, Tensor(a!)[] dests, Tensor index) -> ()")


def _fused_into_impl(kernel: str, inputs: list[torch.Tensor], dests: list[torch.Tensor], index: torch.Tensor) -> None:
    lookup(kernel).call_into(inputs, dests, index)
    # the writes went through raw pointers: bump the version counters as eager's index_copy_ does (fxopt's state
    # checks and autograd's saved-tensor checks read them; NOTE [Model state] in fxopt/state.py)
    for dest in dests:
        torch.autograd.graph.increment_version(dest)


_lib.impl("fused_into", _fused_into_impl, "CPU")
_lib.impl("fused_into", _fused_into_impl, "CUDA")


@torch.library.register_fake("fxopt::fused_into")
def _fused_into_fake(kernel: str, inputs: list[torch.Tensor], dests: list[torch.Tensor], index: torch.Tensor) -> None:
    return None


fused_into_op = torch.ops.fxopt.fused_into.default
