"""Generated kernels written as templates rather than lowered from the graph's ops (short-query attention, GEMV):
what they share. A subclass holds a ``program`` (a frozen dataclass with ``name``, ``backend``, ``input_dtypes``,
``output_dtypes``; codegen prints its source) and says, per input signature, what to allocate and how to launch
(:meth:`TemplateKernel.launch_spec`); this class compiles the source for either target, checks the inputs and
keeps a plan per signature for the generated call path (runtime/kernel.py NOTE [Fused call path])."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import native
from .kernel import GeneratedKernel, check_inputs, inline_preparer


@dataclass
class LaunchSpec:
    """One input signature's launch: the outputs (allocated by the call path), the int64 values after the
    pointers, the CUDA grid and block, and whether there is anything to compute."""

    out_shapes: list[tuple[int, ...]]
    out_strides: list[tuple[int, ...]]
    args: tuple[int, ...]
    grid: tuple[int, ...] = (1,)
    block: int = 128
    numel: int = 1


@dataclass
class _Plan:
    out_shapes: list[tuple[int, ...]]
    out_strides: list[tuple[int, ...]]
    args: tuple[int, ...]
    grid: tuple[int, ...]
    block: int
    numel: int
    c_args: Any = None
    launch: Callable[..., None] | None = None
    inline: dict = field(default_factory=dict)
    prepare: Callable[[], tuple] | None = None
    native: tuple | None = None
    fixes: None = None  # the call path's contract: these kernels address every input as it is


def strides_in_order(shape: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """Dense strides for ``shape`` with its dims laid out in ``order`` (outermost first)."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(list(order)):
        strides[d] = step
        step *= max(1, shape[d])
    return tuple(strides)


class TemplateKernel(GeneratedKernel):
    """A template kernel callable by name through ``torch.ops.fxopt.fused``; subclasses set ``op_names``, define
    ``cuda_source``/``cpp_source`` (of ``self.program``), :meth:`launch_spec` and :meth:`fake`."""

    call_alloc = "empty_strided(plan.out_shapes[{k}], plan.out_strides[{k}], dtype=D{k}, device=device)"
    op_names: list[str] = []

    def __init__(self, program: Any, device: torch.device):
        self.program = program
        self.name = program.name
        self.backend = program.backend
        self.device = self.resolve_device(device)
        self.input_dtypes = tuple(program.input_dtypes)
        self.output_dtypes = tuple(program.output_dtypes)
        self.source = self.cuda_source() if self.backend == "cuda" else self.cpp_source()
        self._plans: dict[Any, _Plan] = {}
        self._bind: Callable[[_Plan], None] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, backend={self.backend!r})"

    def cuda_source(self) -> str:
        raise NotImplementedError

    def cpp_source(self) -> str:
        raise NotImplementedError

    def launch_spec(self, inputs: Sequence[torch.Tensor]) -> LaunchSpec:
        """Check ``inputs`` against what the program computes (a clear error otherwise) and say how to run them."""
        raise NotImplementedError

    # -- compilation -------------------------------------------------------------------------------------------
    def compile(self, binary: bytes | str | None = None) -> "TemplateKernel":
        """Compile and load now (raises CompileError with the compiler log); ``binary``: a cubin or shared library
        built from exactly this source (a saved artifact's)."""
        if self._bind is None:
            self._compile_cuda(binary) if self.backend == "cuda" else self._compile_cpp(binary)
        return self

    def _compile_cpp(self, library_path: str | None = None) -> None:
        from .cc import load_library

        lib = load_library(self.source, name_hint=self.name, path=library_path)
        self._binary = lib._name
        fn = getattr(lib, self.name)
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], None
        ptr_array = ctypes.c_void_p * (len(self.input_dtypes) + len(self.output_dtypes))

        def bind(plan: _Plan) -> None:
            plan.c_args = (ctypes.c_int64 * max(1, len(plan.args)))(*plan.args)
            plan.launch = lambda _stream, *ptrs: fn(ptr_array(*ptrs), plan.c_args)
            plan.native = native.plan_args(plan.out_shapes, plan.out_strides,
                                           native.CPU_ARGS if plan.numel else native.NONE, native.address(fn),
                                           tail=plan.c_args)
            plan.args = ()

        self._bind = bind

    def _compile_cuda(self, cubin: bytes | None = None) -> None:
        from . import driver

        module, self._binary = driver.load_cuda(self.source, device_index=self.device.index, name_hint=self.name,
                                                cubin=cubin)
        function = module.function(self.name)
        launchers: dict[int, Any] = {}

        def bind(plan: _Plan) -> None:
            launcher = launchers.get(len(plan.args))
            if launcher is None:
                types = ["ptr"] * (len(self.input_dtypes) + len(self.output_dtypes)) + ["i64"] * len(plan.args)
                launcher = launchers[len(plan.args)] = function.launcher(types)
            plan.launch = launcher.bind(plan.grid, plan.block)
            plan.prepare = inline_preparer(plan, launcher, plan.grid, plan.block)
            spec = launcher.native(plan.grid, plan.block)
            if not plan.numel:
                plan.native = native.plan_args(plan.out_shapes, plan.out_strides, native.NONE)
            elif spec is not None:
                plan.native = native.plan_args(plan.out_shapes, plan.out_strides, native.CUDA, *spec, tail=plan.args)

        self._bind = bind

    # -- calls (the generated call path: GeneratedKernel.call, runtime/kernel.py) ---------------------------------
    def _plan(self, inputs: Sequence[torch.Tensor], key) -> _Plan:
        check_inputs(self, inputs)
        self.compile()
        spec = self.launch_spec(inputs)
        plan = _Plan(spec.out_shapes, spec.out_strides, tuple(spec.args), tuple(spec.grid), spec.block, spec.numel)
        self._bind(plan)
        self._plans[key] = plan
        return plan


def template_kernel(kernel: TemplateKernel) -> TemplateKernel:
    """The registered kernel of ``kernel``'s program (the first one built for it), compiled."""
    from .kernel import register

    return register(kernel).compile()
