"""Does Programmatic Dependent Launch (PDL) shorten a CUDA graph of many small dependent kernels on Hopper?

Batch-1 decoding replays ~150-250 small kernels per token in one CUDA graph; on an H100 each costs ~2-4 µs, much
of it the gap between one kernel's end and the next one's start. With PDL a kernel is launched with
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (cuLaunchKernelEx); stream capture turns that into a
programmatic graph edge, so the next grid may be scheduled before the previous one has finished, and the kernel
itself waits (``griddepcontrol.wait``) before touching memory the previous kernel used.

A chain of K kernels ``y = x * a + b`` (a = b = 1), each reading the buffer the one before wrote (two buffers,
ping-pong), is captured once per variant and replayed:

  A  plain       plain kernel, cuLaunchKernel (what fxopt does today)
  B  pdl_wait    griddepcontrol.wait first, PDL launch
  C  pdl_early   B plus griddepcontrol.launch_dependents right after the wait (NOTE [Early trigger])
  D  mixed       A and C alternating, like PDL kernels between ones fxopt cannot change (cuBLAS, torch): each PDL
                 kernel follows a plain one, which never triggers early, and each plain one waits in full
  X  racy        (--racy-control) launch_dependents, no wait: a control that should race and come out "correct: NO"
                 (its mismatch does not fail the run; "yes" means no race happened and the check was not tested)

Read the table per numel: "graph µs" is GPU time of one replay (CUDA events, median over rounds, variants
interleaved), "µs/kernel" that over K, "vs A" the ratio to the plain chain (below 1: PDL helps). "prog edges" counts
the programmatic edges in the captured graph (B, C: K - 1; D: K // 2): 0 for a PDL variant means capture dropped the
attribute and its row measures nothing. "correct" is exact: every step adds 1 to small integers, the same steps are
done by torch, and a kernel that read its input too early loses at least 1 (the chain run eagerly once, and the
graph replayed 3 times back to back). At 1<<20 elements the kernels are long enough that the gaps, and PDL, should
stop mattering. Exit status 2 if a variant (other than X) was wrong or could not run.

On a GPU older than sm_90, or a cuda-bindings without cuLaunchKernelEx or the attribute, only A runs.

    python benchmarks/pdl_probe.py [--kernels 200] [--numel 768 4096 1048576] [--rounds 50] [--replays 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys

# NOTE [Early trigger]: launch_dependents only lets the dependent grid be scheduled; its blocks run up to their own
# griddepcontrol.wait, which still returns only once this whole grid has completed and its writes are visible. So
# triggering early cannot cause a race; it only lets the next kernel's blocks take SM slots sooner. The wait comes
# before any access, writes included: kernel k+1 writes the buffer kernel k reads (ping-pong).
KERNELS = {  # name -> (griddepcontrol.wait, griddepcontrol.launch_dependents)
    "chain_plain": (False, False),
    "chain_wait": (True, False),
    "chain_wait_trigger": (True, True),
    "chain_no_wait": (False, True),  # --racy-control only: reads before the previous kernel is done
}
# variant -> kernel and PDL launch for the kernel at an even and at an odd position of the chain
VARIANTS = {
    "A plain": (("chain_plain", False), ("chain_plain", False)),
    "B pdl_wait": (("chain_wait", True), ("chain_wait", True)),
    "C pdl_early": (("chain_wait_trigger", True), ("chain_wait_trigger", True)),
    "D mixed": (("chain_plain", False), ("chain_wait_trigger", True)),
}
RACY = {"X racy control": (("chain_no_wait", True), ("chain_no_wait", True))}
BLOCK = 256
PDL_ATTRIBUTE = "CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION"


def kernel_source(name: str, wait: bool, trigger: bool) -> str:
    """CUDA C++ of one chain kernel ``y[i] = x[i] * a + b``; the griddepcontrol asm only where sm_90+ has it."""
    pdl = []
    if wait:
        pdl.append('    asm volatile("griddepcontrol.wait;" ::: "memory");')
    if trigger:
        pdl.append('    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");')
    guarded = "\n".join(["#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900", *pdl, "#endif", ""]) if pdl else ""
    return (f'extern "C" __global__ void {name}(const float* __restrict__ x, float* __restrict__ y, float a, '
            f"float b, long long n) {{\n{guarded}"
            "    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
            "    if (i < n) y[i] = x[i] * a + b;\n}\n")


def chain_source() -> str:
    """All chain kernels in one module."""
    return "\n".join(kernel_source(name, *flags) for name, flags in KERNELS.items())


def pdl_unavailable(cu, capability: tuple[int, int]) -> str | None:
    """Why PDL cannot run here, or None."""
    if capability < (9, 0):
        return f"the GPU is sm_{capability[0]}{capability[1]}; griddepcontrol needs sm_90+"
    for owner, name in ((cu, "cuLaunchKernelEx"), (cu.CUlaunchAttributeID, PDL_ATTRIBUTE)):
        if not hasattr(owner, name):
            return f"this cuda-bindings has no {name}"
    return None


def make_launch(cu, check, fn, pdl: bool, numel: int):
    """launch(stream, x, y): one chain kernel; cuLaunchKernelEx with the PDL attribute, else cuLaunchKernel."""
    grid = (numel + BLOCK - 1) // BLOCK
    x, y = ctypes.c_void_p(), ctypes.c_void_p()
    values = (x, y, ctypes.c_float(1.0), ctypes.c_float(1.0), ctypes.c_int64(numel))  # the kernel's x, y, a, b, n
    params = (ctypes.c_void_p * len(values))(*map(ctypes.addressof, values))  # read by the driver at each launch
    address = ctypes.addressof(params)
    if pdl:
        attr = cu.CUlaunchAttribute()
        attr.id = getattr(cu.CUlaunchAttributeID, PDL_ATTRIBUTE)
        attr.value.programmaticStreamSerializationAllowed = 1
        config = cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = BLOCK, 1, 1
        config.sharedMemBytes = 0
        config.attrs = [attr]  # assign the whole list: the getter returns a copy (cuda-bindings' docs)
        config.numAttrs = 1

    def launch(stream: int, x_ptr: int, y_ptr: int) -> None:
        x.value, y.value = x_ptr, y_ptr
        if pdl:
            config.hStream = stream
            check(cu.cuLaunchKernelEx(config, fn, address, 0)[0], "cuLaunchKernelEx")
        else:
            check(cu.cuLaunchKernel(fn, grid, 1, 1, BLOCK, 1, 1, 0, stream, address, 0)[0], "cuLaunchKernel")

    launch.keep = (values, params)  # what ``address`` points into lives as long as the launch
    return launch


def run_chain(launches: list, bufs: list) -> None:
    """Kernel k reads bufs[k % 2], writes bufs[(k + 1) % 2] (torch's current stream); the result is in bufs[K % 2]."""
    import torch

    stream = torch.cuda.current_stream().cuda_stream
    for k, launch in enumerate(launches):
        launch(stream, bufs[k % 2].data_ptr(), bufs[(k + 1) % 2].data_ptr())


def reference(x0, kernels: int, replays: int):
    """What bufs[K % 2] holds after ``replays`` runs of the chain from bufs[0] = x0, step by step with torch."""
    bufs = [x0.clone(), x0.clone()]  # bufs[1]'s first value is never read: kernel 0 writes it first
    for _ in range(replays):  # a replay starts from whatever bufs[0] holds
        for k in range(kernels):
            bufs[(k + 1) % 2] = bufs[k % 2] * 1.0 + 1.0
    return bufs[kernels % 2]


def programmatic_edges(cu, graph) -> int | None:
    """Programmatic edges of a captured torch graph (cuda-bindings 13's cuGraphGetEdges), None where unknown."""
    try:
        res = cu.cuGraphGetEdges(graph.raw_cuda_graph(), 0)  # the count
        if res[0] == cu.CUresult.CUDA_SUCCESS:
            res = cu.cuGraphGetEdges(graph.raw_cuda_graph(), res[-1])
    except (AttributeError, RuntimeError, TypeError):  # torch without keep_graph, older bindings: only reported
        return None
    if res[0] != cu.CUresult.CUDA_SUCCESS or len(res) < 5:  # cuda-bindings 12 returns no edge data here
        return None
    programmatic = int(cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC)
    return sum(int(edge.type) == programmatic for edge in res[3])


def capture_variant(name: str, launches: list, bufs: list, x0, kernels: int) -> tuple[object, dict]:
    """(graph, row) of one variant: its chain run eagerly and checked, captured, replayed 3 times and checked."""
    import torch
    from cuda.bindings import driver as cu

    row = {"numel": x0.numel(), "variant": name, "kernels": kernels}
    bufs[0].copy_(x0)
    try:
        run_chain(launches, bufs)  # eager, outside capture: a launch the driver refuses fails here
    except RuntimeError as e:
        print(f"pdl_probe: {name} skipped: {e}", file=sys.stderr)
        return None, {**row, "error": str(e)}
    torch.cuda.synchronize()
    eager_ok = torch.equal(bufs[kernels % 2], reference(x0, kernels, 1))
    try:
        graph = torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:  # torch without keep_graph: no edge count
        graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_chain(launches, bufs)
    row["programmatic_edges"] = programmatic_edges(cu, graph)
    if hasattr(graph, "instantiate"):
        graph.instantiate()
    bufs[0].copy_(x0)
    for _ in range(3):  # back-to-back replays: the first kernel of one against the last of the one before
        graph.replay()
    torch.cuda.synchronize()
    graph_ok = torch.equal(bufs[kernels % 2], reference(x0, kernels, 3))
    row["correct"] = eager_ok and graph_ok
    if not row["correct"] and not name.startswith("X"):
        print(f"!! MISMATCH: {name} at numel {x0.numel()}: eager {'ok' if eager_ok else 'WRONG'}, graph "
              f"{'ok' if graph_ok else 'WRONG'}: a kernel read its input before the previous one finished",
              file=sys.stderr)
    return graph, row


def time_graphs(graphs: dict, rounds: int, replays: int) -> dict[str, list[float]]:
    """µs of GPU time per replay (CUDA events around ``replays`` replays), one value per round, round-robin order."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    names = list(graphs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for name in names[r % len(names):] + names[:r % len(names)]:
            start.record()
            for _ in range(replays):
                graphs[name].replay()
            end.record()
            end.synchronize()
            if r:
                times[name].append(start.elapsed_time(end) * 1000 / replays)
    return times


def probe(numel: int, variants: dict, fns: dict, args) -> list[dict]:
    """Check, capture and time each variant's chain of ``args.kernels`` kernels over ``numel`` elements."""
    import torch
    from cuda.bindings import driver as cu
    from fxopt.runtime.driver import check

    x0 = (torch.arange(numel, device="cuda") % 1024).float()  # small integers: every step is exact in float32
    bufs = [torch.empty_like(x0), torch.empty_like(x0)]
    graphs, rows = {}, {}
    for name, (even, odd) in variants.items():
        made = {spec: make_launch(cu, check, fns[spec[0]].cu_handle, spec[1], numel) for spec in {even, odd}}
        graph, rows[name] = capture_variant(name, [made[odd if k % 2 else even] for k in range(args.kernels)],
                                            bufs, x0, args.kernels)
        if graph is not None:
            graphs[name] = graph
    times = time_graphs(graphs, args.rounds, args.replays)
    base = statistics.median(times["A plain"]) if "A plain" in times else None
    for name, t in times.items():
        median = statistics.median(t)
        rows[name].update(graph_us_median=median, graph_us_min=min(t), kernel_us_median=median / args.kernels,
                          kernel_us_min=min(t) / args.kernels, vs_plain=median / base if base else None)
    return list(rows.values())


def table_row(row: dict) -> list:
    if "error" in row:
        return [row["numel"], row["variant"], "", "", "", "", "", f"failed: {row['error'][:60]}"]
    vs_plain = f"{row['vs_plain']:.3f}" if row["vs_plain"] else ""
    return [row["numel"], row["variant"], f"{row['graph_us_median']:.1f}", f"{row['graph_us_min']:.1f}",
            f"{row['kernel_us_median']:.3f}", vs_plain, row["programmatic_edges"], "yes" if row["correct"] else "NO"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", type=int, default=200, help="kernels in the chain (K)")
    parser.add_argument("--numel", type=int, nargs="+", default=[768, 4096, 1 << 20], help="elements per kernel")
    parser.add_argument("--rounds", type=int, default=50, help="timed rounds, variants interleaved")
    parser.add_argument("--replays", type=int, default=20, help="graph replays timed together in a round")
    parser.add_argument("--racy-control", action="store_true", help="add variant X, which should fail the check")
    parser.add_argument("--out", default=os.environ.get("OUT") or "reports", help="folder for pdl_probe.json")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("pdl_probe: no CUDA GPU visible to torch; nothing to measure", file=sys.stderr)
        return 1
    import cuda.bindings
    from cuda.bindings import driver as cu
    from fxopt.report.measure import environment
    from fxopt.runtime import driver, nvrtc
    from tabulate import tabulate

    capability = torch.cuda.get_device_capability()
    skipped = pdl_unavailable(cu, capability)
    variants = {name: spec for name, spec in VARIANTS.items() if skipped is None or name.startswith("A")}
    if args.racy_control and skipped is None:
        variants.update(RACY)
    if skipped:
        print(f"pdl_probe: PDL variants skipped: {skipped}; running A only")
    cubin = nvrtc.compile_cuda(chain_source(), arch=nvrtc.current_arch(), name_hint="pdl_chain")
    module = driver.load_module(cubin)
    fns = {name: module.function(name) for name in KERNELS}
    rows = [row for numel in args.numel for row in probe(numel, variants, fns, args)]

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuda-bindings {cuda.bindings.__version__}, "
          f"K = {args.kernels}, median of {args.rounds} rounds x {args.replays} replays")
    print(tabulate([table_row(r) for r in rows], tablefmt="github",
                   headers=["numel", "variant", "graph µs", "min", "µs/kernel", "vs A", "prog edges", "correct"]))
    result = {"environment": environment(torch.device("cuda")), "device_name": torch.cuda.get_device_name(),
              "torch": torch.__version__, "cuda_bindings": cuda.bindings.__version__,
              "capability": f"{capability[0]}.{capability[1]}", "pdl_skipped": skipped, "kernels": args.kernels,
              "rounds": args.rounds, "replays": args.replays, "source": chain_source(), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pdl_probe.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    failed = [r for r in rows if not r.get("correct") and not r["variant"].startswith("X")]
    for r in failed:
        print(f"!! {r['variant']} at numel {r['numel']}: {r.get('error') or 'WRONG RESULT'}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
