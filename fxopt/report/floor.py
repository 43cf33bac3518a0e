"""The floor: how fast fxopt's graph could run at best on this device.

For every kernel the optimized graph launches (fxopt's fused kernels and the ATen ops left, GEMMs and convs), the
time it needs at least is ``max(bytes moved / memory bandwidth, flops / peak rate)``; the floor is the sum of these
plus the launch floor, ``kernels x the replay cost of one CUDA-graph node``. Bandwidth (a device-to-device copy),
peak rate (a large matrix product) and the node cost (a CUDA graph of tiny kernels) are measured once per device,
torch version and dtype, and cached beside fxopt's kernel cache. Bytes and flops are counted on any device; the
times need CUDA.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .. import ops
from ..runtime.cache import atomic_output, cache_dir, cache_key
from .measure import quiet_profiler

log = logging.getLogger(__name__)

CALIBRATION_VERSION = "1"


# -- per-node bytes and flops -------------------------------------------------------------------------------------
@dataclass
class NodeCost:
    """One launching node of a graph: what it reads and writes, and the flops it does (0 for elementwise)."""

    node: str
    op: str
    kernel: str | None  # the fxopt kernel a fused node calls
    bytes: int
    flops: int


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading (or writing) ``t``: the elements its strides reach, so a broadcast (stride 0)
    input counts once per distinct element."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 1)
    return min(span, t.numel()) * t.element_size()


def _unique_tensors(values: Any) -> list[torch.Tensor]:
    seen, out = set(), []
    for v in pytree.tree_leaves(values):
        if isinstance(v, torch.Tensor):
            key = (v.data_ptr(), tuple(v.shape), v.stride(), v.dtype)
            if key not in seen:
                seen.add(key)
                out.append(v)
    return out


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    """Flop formulas for the fused GEMM/conv ops fxopt's epilogue pass emits, which FlopCounterMode lacks."""
    from torch.utils.flop_counter import conv_flop_count

    def addmm_activation(bias, a, b, *args, out_shape=None, **kwargs) -> int:  # shapes, as FlopCounterMode passes
        (m, k), (_, n) = a, b
        return 2 * m * n * k

    def conv_fused(x, w, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(x, w, out_shape, transposed=False)

    formulas: dict[Any, Callable[..., int]] = {torch.ops.aten._addmm_activation: addmm_activation}
    for name in ("cudnn_convolution_relu", "cudnn_convolution_add_relu"):
        if hasattr(torch.ops.aten, name):
            formulas[getattr(torch.ops.aten, name)] = conv_fused
    return formulas


class _CostInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.costs: list[NodeCost] = []
        self.formulas = _flop_formulas()

    def run_node(self, n: fx.Node) -> Any:
        if not ops.launches_kernel(n, self.module):
            return super().run_node(n)
        from torch.utils.flop_counter import FlopCounterMode

        args, kwargs = self.fetch_args_kwargs_from_env(n)
        reads = _unique_tensors((args, kwargs))
        if n.op == "call_module":  # a module's weights are inputs too
            reads += _unique_tensors(list(self.module.get_submodule(n.target).state_dict(keep_vars=True).values()))
        counter = FlopCounterMode(display=False, custom_mapping=self.formulas)
        with counter:
            result = super().run_node(n)
        written = _unique_tensors(result)
        kernel = n.args[0] if n.meta.get("fxopt_kernel") and n.args and isinstance(n.args[0], str) else None
        self.costs.append(NodeCost(n.name, ops.describe(n), kernel, sum(map(tensor_bytes, reads)) +
                                   sum(map(tensor_bytes, written)), int(counter.get_total_flops())))
        return result


def node_costs(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[NodeCost]:
    """Bytes and flops of every launching node of ``gm``, from one run on ``inputs`` (FlopCounterMode's formulas:
    2*M*N*K for a GEMM, the same for convolutions; elementwise ops count 0)."""
    interp = _CostInterpreter(gm)
    with torch.no_grad():
        interp.run(*inputs)
    return interp.costs


# -- the device's measured limits ---------------------------------------------------------------------------------
@dataclass
class DeviceLimits:
    """What this device can do at best, measured: copy bandwidth, matrix-product rate, CUDA-graph node cost."""

    device_name: str
    torch: str
    dtype: str
    bandwidth_gbps: float  # GB/s (1e9 bytes/s), bytes read + written by a device-to-device copy
    peak_tflops: float  # 2*n^3 / time of an n x n matrix product in ``dtype``
    graph_node_us: float  # replay cost of one more node in a CUDA graph of tiny kernels
    graph_launch_us: float  # replay + sync of a one-node CUDA graph, from the host
    measured: str  # date
    details: dict[str, Any]
    source: str = "measured"  # or "cache"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median_cuda_seconds(fn: Callable[[], Any], *, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _measure_bandwidth(device: torch.device) -> tuple[float, dict[str, Any]]:
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = max(1 << 24, min(1 << 30, free // 4)) // 4096 * 4096
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = _median_cuda_seconds(lambda: dst.copy_(src), iters=20, warmup=3)
    return 2 * nbytes / seconds / 1e9, {"copy_bytes": nbytes, "copy_us": seconds * 1e6}


def _measure_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, dict[str, Any]]:
    free, _ = torch.cuda.mem_get_info(device)
    elem = torch.empty((), dtype=dtype).element_size()
    n = 8192
    while n > 1024 and 3 * n * n * elem > free // 2:
        n //= 2
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _median_cuda_seconds(lambda: torch.mm(a, b, out=c), iters=10, warmup=3)
    return 2 * n ** 3 / seconds / 1e12, {"matmul_n": n, "matmul_us": seconds * 1e6}


def _measure_graph_node(device: torch.device, nodes: int = 500) -> tuple[float, float, dict[str, Any]]:
    x = torch.zeros(1, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            x.add_(1)
    torch.cuda.current_stream(device).wait_stream(side)

    def graph_of(n: int) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                x.add_(1)
        return g

    def replay_seconds(g: torch.cuda.CUDAGraph) -> float:
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize(device)
        samples = []
        for _ in range(30):
            t0 = time.perf_counter()
            g.replay()
            torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    one, many = graph_of(1), graph_of(nodes)
    t_one, t_many = replay_seconds(one), replay_seconds(many)
    per_node = max(0.0, (t_many - t_one) / (nodes - 1))
    return per_node * 1e6, t_one * 1e6, {"graph_nodes": nodes, "graph_replay_us": t_many * 1e6}


def _calibration_path(device_name: str, dtype: torch.dtype) -> Path:
    key = cache_key(CALIBRATION_VERSION, device_name, torch.__version__, str(dtype),
                    str(torch.backends.cuda.matmul.allow_tf32), torch.get_float32_matmul_precision())
    return cache_dir() / "report" / f"device-limits-{key}.json"


def device_limits(device: torch.device, dtype: torch.dtype = torch.float32, *,
                  refresh: bool = False) -> DeviceLimits | None:
    """The measured limits of a CUDA ``device`` for ``dtype`` (cached; ``refresh`` measures again); None off CUDA."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_properties(device).name
    return cached_limits(_calibration_path(name, dtype), lambda: _measure_limits(device, dtype, name), refresh=refresh)


def _measure_limits(device: torch.device, dtype: torch.dtype, name: str) -> DeviceLimits:
    import datetime

    bandwidth, d1 = _measure_bandwidth(device)
    peak, d2 = _measure_peak(device, dtype)
    node_us, launch_us, d3 = _measure_graph_node(device)
    torch.cuda.empty_cache()
    return DeviceLimits(name, torch.__version__, str(dtype).replace("torch.", ""), bandwidth, peak, node_us, launch_us,
                        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        {**d1, **d2, **d3, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})


def cached_limits(path: Path, measure: Callable[[], DeviceLimits], *, refresh: bool = False) -> DeviceLimits:
    """``measure()`` once, kept in ``path``; later calls read it back (``source == "cache"``)."""
    if path.is_file() and not refresh:
        try:
            data = json.loads(path.read_text())
            data["source"] = "cache"
            return DeviceLimits(**data)
        except (ValueError, TypeError) as e:  # an old or damaged entry: measure again
            log.info("ignoring the cached device limits %s: %s", path, e)
    limits = measure()
    data = limits.as_dict()
    data.pop("source")
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
    return limits


# -- the floor ------------------------------------------------------------------------------------------------------
def node_floor_us(cost: NodeCost, limits: DeviceLimits) -> tuple[float, float]:
    """(memory time, compute time) of one node at the device's limits, in microseconds."""
    return cost.bytes / (limits.bandwidth_gbps * 1e3), cost.flops / (limits.peak_tflops * 1e6)


def compute_floor(costs: Sequence[NodeCost], limits: DeviceLimits | None, kernels: int | None) -> dict[str, Any]:
    """The floor of a graph whose launching nodes cost ``costs``, launching ``kernels`` GPU kernels per forward."""
    nodes = []
    roofline = 0.0
    for c in costs:
        row = asdict(c)
        if limits is not None:
            mem_us, flop_us = node_floor_us(c, limits)
            row.update(memory_us=mem_us, compute_us=flop_us, floor_us=max(mem_us, flop_us),
                       bound="compute" if flop_us > mem_us else "memory")
            roofline += max(mem_us, flop_us)
        nodes.append(row)
    result: dict[str, Any] = {
        "available": limits is not None,
        "reason": None if limits is not None else "needs CUDA: bandwidth, peak rate and graph-node cost are "
                                                  "measured on the GPU",
        "limits": limits.as_dict() if limits is not None else None,
        "bytes": sum(c.bytes for c in costs),
        "flops": sum(c.flops for c in costs),
        "launching_nodes": len(costs),
        "kernels": kernels,
        "roofline_us": None, "launch_us": None, "total_us": None,
        "nodes": nodes,
    }
    if limits is not None:
        launch = (kernels if kernels is not None else len(costs)) * limits.graph_node_us
        result.update(roofline_us=roofline, launch_us=launch, total_us=roofline + launch)
    return result


# -- GPU time per fxopt kernel --------------------------------------------------------------------------------------
def kernel_gpu_times(fn: Callable[..., Any], inputs: Sequence[Any], names: Sequence[str], *,
                     repeats: int = 10) -> dict[str, list[float]]:
    """Per kernel name: the GPU microseconds of each of its launches over ``repeats`` forwards, in launch order, from
    the profiler's kernel events whose names start with it (fxopt's entry points are ``<name>_flat`` / ``_vec`` /
    ``_strided``, row-wise ones ``<name>``)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            fn(*inputs)
        torch.cuda.synchronize()
        with quiet_profiler(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                fn(*inputs)
            torch.cuda.synchronize()
    events: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    ordered = sorted(names, key=len, reverse=True)  # the longest matching name wins
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = next((n for n in ordered if evt.name.startswith(n)), None)
        if name is not None:
            events[name].append((evt.time_range.start, evt.time_range.end - evt.time_range.start))
    return {n: [d for _, d in sorted(e)] for n, e in events.items()}


def split_launches(durations: Sequence[float], nodes: int, repeats: int) -> list[list[float]] | None:
    """Durations of one kernel's launches over ``repeats`` forwards, split among the ``nodes`` graph nodes that call
    it (in graph order, each launching the same number of times per forward); None when they do not divide evenly."""
    if not durations or len(durations) % (nodes * repeats):
        return None
    per = len(durations) // (nodes * repeats)
    out: list[list[float]] = [[] for _ in range(nodes)]
    for i in range(0, len(durations), per):
        out[(i // per) % nodes].extend(durations[i:i + per])
    return out
