"""The native replay of a captured CUDA graph (native_call.cpp's ``graph_call``, NOTE [Native graph call] in
fxopt/runtime/cudagraph/replay.py), on the CPU: the driver entry points it calls (cuGraphExecKernelNodeSetParams,
cuGraphLaunch) are ctypes stand-ins that record what they were given, and the outputs are CPU tensors. The GPU side
(real graphs, streams) is in tests/gpu/test_native_graph_call_gpu.py."""

from __future__ import annotations

import ctypes
import struct

import pytest
import torch


# CUDA_KERNEL_NODE_PARAMS_v2: func, grid xyz, block xyz, shared memory, kernelParams, extra, kern, ctx
_NODE_PARAMS = struct.Struct("@P7IPPPP")
_SET_PARAMS = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
EXEC, IN_NODE, OUT_NODE, FUNC, STATIC_IN, STATIC_OUT = 0xE0, 0x11, 0x22, 0xF0, 0x1000, 0x2000


class FakeDriver:
    """Records each node update as (exec, node, func, grid, block, (src, dst, nbytes)) and each launch."""

    def __init__(self, set_result: int = 0, launch_result: int = 0):
        self.updates, self.launches = [], []

        def set_params(graph_exec, node, params):
            func, gx, gy, gz, bx, by, bz, _, kernel_params, *_ = _NODE_PARAMS.unpack(
                ctypes.string_at(params, _NODE_PARAMS.size))
            slots = (ctypes.c_void_p * 3).from_address(kernel_params)
            values = tuple(ctypes.c_uint64.from_address(slots[i]).value for i in range(3))
            self.updates.append((graph_exec, node, func, (gx, gy, gz), (bx, by, bz), values))
            return set_result

        def launch(graph_exec, stream):
            self.launches.append((graph_exec, stream))
            return launch_result

        self._keep = (_SET_PARAMS(set_params), _LAUNCH(launch))  # alive as long as the driver
        self.set_params_address = ctypes.cast(self._keep[0], ctypes.c_void_p).value
        self.launch_address = ctypes.cast(self._keep[1], ctypes.c_void_p).value


@pytest.fixture()
def mod(native_module):
    return native_module


def _make(mod, driver, *, n_out=1, kind=0, fixed=None, fallback=None):
    fallback = fallback or (lambda args: ("fallback", args))
    inputs = [(0, IN_NODE, FUNC, 3, 256, STATIC_IN, 4 * 6)]  # argument 0, a float32[2, 3], copied to STATIC_IN
    outputs = [(OUT_NODE + j, FUNC, 2, 256, STATIC_OUT + 0x100 * j, 4 * 6, (2, 3), (3, 1), torch.float32)
               for j in range(n_out)]
    return mod.graph_call("test", fallback, torch.device("cpu"), torch.Tensor, torch.nn.Parameter,
                          driver.set_params_address, driver.launch_address, EXEC, inputs, outputs, kind, fixed,
                          None)


def test_a_call_points_the_copy_nodes_and_launches_once(mod):
    driver = FakeDriver()
    call = _make(mod, driver)
    x = torch.randn(2, 3)
    out = call((x,), 0x5)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3) and out.stride() == (3, 1)
    (e, node, func, grid, block, values), (e2, node2, func2, grid2, _, values2) = driver.updates
    assert (e, node, func, grid, block) == (EXEC, IN_NODE, FUNC, (3, 1, 1), (256, 1, 1))
    assert values == (x.data_ptr(), STATIC_IN, 24)  # caller's tensor -> static buffer
    assert (e2, node2, func2, grid2) == (EXEC, OUT_NODE, FUNC, (2, 1, 1))
    assert values2 == (STATIC_OUT, out.data_ptr(), 24)  # pool output -> this call's fresh tensor
    assert driver.launches == [(EXEC, 0x5)]
    assert mod.graph_launches(call) == 1
    out2 = call((torch.randn(2, 3),), 0x5)
    assert out2.data_ptr() != out.data_ptr()  # a fresh tensor every call (the first is still alive)
    assert mod.graph_launches(call) == 2


def test_outputs_come_back_as_a_tuple_or_the_fixed_object(mod):
    driver = FakeDriver()
    two = _make(mod, driver, n_out=2, kind=1)
    got = two((torch.randn(2, 3),), 0)
    assert type(got) is tuple and len(got) == 2 and got[0].data_ptr() != got[1].data_ptr()
    fixed = (torch.zeros(1), torch.ones(1))
    unsafe = _make(mod, FakeDriver(), n_out=0, kind=2, fixed=fixed)
    assert unsafe((torch.randn(2, 3),), 0) is fixed


def test_anything_unexpected_goes_to_the_python_closure(mod):
    seen = []

    def fallback(args):
        seen.append(args)
        return "python"

    driver = FakeDriver()
    call = _make(mod, driver, fallback=fallback)
    wrong_size = (torch.randn(3, 3),)  # the copy would leave its bounds: never pointed
    assert call(wrong_size, 0) == "python"

    class Sub(torch.Tensor):
        pass

    sub = (torch.randn(2, 3).as_subclass(Sub),)  # may not own real memory
    assert call(sub, 0) == "python"
    assert call([torch.randn(2, 3)], 0) == "python"  # not a tuple
    assert call((), 0) == "python"  # too few arguments
    assert len(seen) == 4 and seen[0] is wrong_size and seen[1] is sub and seen[3] == ()
    assert driver.launches == [] and driver.updates == []
    assert mod.graph_launches(call) == 0


@pytest.mark.parametrize("where", ["set_params", "launch"])
def test_a_driver_error_goes_to_the_python_closure(mod, where):
    driver = FakeDriver(set_result=1 if where == "set_params" else 0, launch_result=1 if where == "launch" else 0)
    call = _make(mod, driver, fallback=lambda args: "python")
    assert call((torch.randn(2, 3),), 0) == "python"  # it re-points every node and raises the driver's error
    assert mod.graph_launches(call) == 0


def test_bad_construction_is_refused(mod):
    driver = FakeDriver()
    with pytest.raises(ValueError, match="result_kind"):
        _make(mod, driver, n_out=2, kind=0)
    with pytest.raises(ValueError, match="result_kind"):
        _make(mod, driver, n_out=1, kind=2, fixed=object())
    with pytest.raises(TypeError):
        mod.graph_call("x", None, torch.device("cpu"), torch.Tensor, torch.nn.Parameter, 0, 0, EXEC, [], [], 2, None,
                       None)


def test_the_call_keeps_its_graph_and_lets_go_of_it(mod):
    """The C++ object holds the graph it launches (``keep``) and nothing else that could lead back to it: its
    references are invisible to the garbage collector (NOTE [Native graph call])."""
    import gc
    import weakref

    class Graph:
        pass

    graph = Graph()
    ref = weakref.ref(graph)
    call = mod.graph_call("t", lambda args: None, torch.device("cpu"), torch.Tensor, torch.nn.Parameter,
                          FakeDriver().set_params_address, 1, EXEC, [], [], 2, (), graph)
    del graph
    gc.collect()
    assert ref() is not None
    del call
    gc.collect()
    assert ref() is None
