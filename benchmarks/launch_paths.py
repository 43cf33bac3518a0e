"""GPU check of issue 17 (NVIDIA's cuda-bindings instead of hand-written ctypes): host time of one kernel launch from
Python, fxopt's paths (NOTE [Hot driver calls] and [Launch trampoline] in fxopt/runtime/driver.py) against
cuda-bindings' own cuLaunchKernel, alone and beside a busy Python thread; then runtime/graph_io.py's graph-node
update both ways. Every method's result is checked first. (2026-12-06, H100: the graph-node section failed with
CUDA_ERROR_INVALID_VALUE on this script's own node, while the CUDA-graph tests, which update nodes the same way,
passed: unexplained, to look at on the next GPU session.)

    python benchmarks/launch_paths.py [--n 20000] [--rounds 9] [--window 0.5]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import struct
import threading
import time
from typing import Callable

import torch

import cuda.bindings
from cuda.bindings import driver as cu
from fxopt.runtime import driver, graph_io, nvrtc

SOURCE = r"""
extern "C" __global__ void axpb(const float* a, const float* b, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] * 2.0f + b[i];
}
"""
TYPES = ["ptr", "ptr", "ptr", "i64"]


def launch_methods(fn: driver.CudaFunction, stream: int, ptrs: tuple) -> dict[str, Callable[[], None]]:
    """Ways to launch ``fn`` (TYPES) on ``stream`` with ``ptrs`` on grid 1 x block 64, each raising on failure."""
    launcher = fn.launcher(TYPES)
    methods: dict[str, Callable[[], None]] = {}
    inline = launcher.prepared(1, 64)
    if inline:
        pack, storage, offset, config, tramp, address = inline

        def fxopt_inline():  # what the generated call path does (fxopt/runtime/kernel.py, _LAUNCH_CUDA)
            pack(storage, offset, *config, stream, *ptrs)
            if tramp(address):
                raise RuntimeError("launch failed")

        methods["fxopt: generated call path (pack + C trampoline, GIL held)"] = fxopt_inline
    methods["fxopt: Launcher.__call__"] = lambda: launcher(1, 64, stream, *ptrs)
    direct = driver.Launcher(fn.handle, TYPES, driver.cu_launch_kernel())
    direct._tramp = None  # the path without a C++ compiler
    methods["fxopt without a C++ compiler (ctypes, raw cuLaunchKernel, GIL held)"] = lambda: direct(1, 64, stream, *ptrs)

    f = cu.CUfunction(init_value=fn.handle)
    store = (ctypes.c_uint64 * 4)()
    base = ctypes.addressof(store)
    params = (ctypes.c_void_p * 4)(base, base + 8, base + 16, base + 24)
    params_address = ctypes.addressof(params)
    pack_values = struct.Struct("@PPPq").pack_into
    launch = cu.cuLaunchKernel

    def bindings_prepared():
        pack_values(store, 0, *ptrs)
        if launch(f, 1, 1, 1, 64, 1, 1, 0, stream, params_address, 0)[0]:
            raise RuntimeError("launch failed")

    bindings_prepared.keep = params  # the array its address points at lives as long as the method

    types = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

    def bindings_tuple():
        if launch(f, 1, 1, 1, 64, 1, 1, 0, stream, (ptrs, types), 0)[0]:
            raise RuntimeError("launch failed")

    methods["cuda-bindings cuLaunchKernel, kernelParams built once (GIL released)"] = bindings_prepared
    methods["cuda-bindings cuLaunchKernel, (values, types) per call"] = bindings_tuple
    return methods


def time_back_to_back(methods: dict, n: int, rounds: int, sync: Callable[[], None]) -> dict[str, float]:
    """µs per call: ``n`` calls back to back, median over rounds, methods interleaved within each round."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            sync()
            start = time.perf_counter()
            for _ in range(n):
                method()
            times[name].append((time.perf_counter() - start) / n * 1e6)
            sync()
    return {name: statistics.median(t) for name, t in times.items()}


def time_beside_busy_thread(methods: dict, window: float, sync: Callable[[], None]) -> dict[str, float]:
    """µs per call while another Python thread spins (wall time over ``window`` s; the GIL is shared)."""
    stop = threading.Event()

    def spin():
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        out = {}
        for name, method in methods.items():
            sync()
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < window:
                for _ in range(50):
                    method()
                calls += 50
            out[name] = (time.perf_counter() - start) / calls * 1e6
            sync()
        return out
    finally:
        stop.set()
        spinner.join()


def show(title: str, results: dict[str, float]) -> None:
    print(f"\n{title}")
    for name, us in results.items():
        print(f"  {us:9.2f} µs  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000, help="calls per round and method")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--window", type=float, default=0.5, help="seconds per method beside the busy thread")
    args = parser.parse_args()

    _, version = cu.cuDriverGetVersion()
    print(f"cuda-bindings {cuda.bindings.__version__} (built for CUDA {cu.CUDA_VERSION}), driver API {version}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}")
    print(f"NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))} at {nvrtc.nvrtc_library_path()}")

    n = 64
    a, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out, spare = torch.empty_like(a), torch.zeros(n, device="cuda")
    expected = a * 2 + b
    cubin = nvrtc.compile_cuda(SOURCE, arch=nvrtc.current_arch(), name_hint="axpb")
    fn = driver.load_module(cubin).function("axpb")
    methods = launch_methods(fn, torch.cuda.current_stream().cuda_stream, (a.data_ptr(), b.data_ptr(),
                                                                           out.data_ptr(), n))
    for name, method in methods.items():  # correctness first, and a warm-up
        out.zero_()
        for _ in range(10):
            method()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, msg=name)
    methods["eager torch op (spare.add_(1.0)), for scale"] = lambda: spare.add_(1.0)
    sync = torch.cuda.synchronize
    show(f"host time per launch ({args.n} back to back, median of {args.rounds} rounds):",
         time_back_to_back(methods, args.n, args.rounds, sync))
    show(f"the same beside a busy Python thread ({args.window} s each):",
         time_beside_busy_thread(methods, args.window, sync))
    graph_update(args)


def graph_update(args) -> None:
    """runtime/graph_io.py's node update (CopyNode.point: the raw cuGraphExecKernelNodeSetParams, GIL held) against
    cuda-bindings' cuGraphExecKernelNodeSetParams on the same node."""
    if graph_io.available() is not None:
        print(f"\ngraph node update: skipped ({graph_io.available()})")
        return
    device = torch.cuda.current_device()
    x, x2, y = torch.randn(4096, device="cuda"), torch.randn(4096, device="cuda"), torch.zeros(4096, device="cuda")
    nbytes = x.numel() * x.element_size()
    graph_io.prepare(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        node = graph_io.CopyNode(device, torch.cuda.current_stream().cuda_stream, y.data_ptr(), y.data_ptr(), nbytes)
    graph_exec = graph.raw_cuda_graph_exec()
    node.attach(graph_exec)
    _, node_handle, func, grid, threads, _, _ = node.native_input(0, nbytes)

    store = (ctypes.c_uint64 * 3)(x2.data_ptr(), y.data_ptr(), nbytes)
    base = ctypes.addressof(store)
    slots = (ctypes.c_void_p * 3)(base, base + 8, base + 16)
    params = cu.CUDA_KERNEL_NODE_PARAMS()
    params.func = cu.CUfunction(init_value=func)
    params.gridDimX, params.gridDimY, params.gridDimZ = grid, 1, 1
    params.blockDimX, params.blockDimY, params.blockDimZ = threads, 1, 1
    params.sharedMemBytes = 0
    params.kernelParams = ctypes.addressof(slots)
    set_params = cu.cuGraphExecKernelNodeSetParams

    def fxopt_point():
        node.point(x.data_ptr(), y.data_ptr(), nbytes)

    def bindings():
        store[0], store[1], store[2] = x2.data_ptr(), y.data_ptr(), nbytes
        if set_params(graph_exec, node_handle, params)[0]:
            raise RuntimeError("cuGraphExecKernelNodeSetParams failed")

    methods = {"fxopt: graph_io.CopyNode.point (raw entry point, GIL held)": fxopt_point,
               "cuda-bindings cuGraphExecKernelNodeSetParams (GIL released)": bindings}
    for (name, method), source in zip(methods.items(), (x, x2)):
        y.zero_()
        method()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, source, msg=name)
    show(f"host time per graph kernel-node update ({args.n} back to back, median of {args.rounds} rounds):",
         time_back_to_back(methods, args.n, args.rounds, lambda: None))
    show(f"the same beside a busy Python thread ({args.window} s each):",
         time_beside_busy_thread(methods, args.window, lambda: None))


if __name__ == "__main__":
    main()
