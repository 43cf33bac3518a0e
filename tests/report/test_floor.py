"""The floor's arithmetic on CPU: bytes and flops per launching node, the sum with given device limits, the cache of
the measured limits, and how profiled launches are split among nodes sharing a kernel."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fxopt
from fxopt import models
from fxopt.report import floor


def _limits(**kw):
    base = dict(device_name="Fake GPU", torch=torch.__version__, dtype="float32", bandwidth_gbps=2000.0,
                peak_tflops=50.0, graph_node_us=1.5, graph_launch_us=8.0, measured="2026-01-01", details={})
    base.update(kw)
    return floor.DeviceLimits(**base)


def _costs(model, inputs):
    opt = fxopt.optimize(model, inputs)
    return floor.node_costs(opt.specializations[-1].graph_module, inputs)


def test_tensor_bytes_counts_what_the_strides_reach():
    assert floor.tensor_bytes(torch.empty(4, 8)) == 4 * 8 * 4
    assert floor.tensor_bytes(torch.empty(8).expand(4, 8)) == 8 * 4  # broadcast: each element once
    assert floor.tensor_bytes(torch.empty(8, 4).t()) == 4 * 8 * 4
    assert floor.tensor_bytes(torch.empty(0, 3)) == 0
    assert floor.tensor_bytes(torch.empty(2, 3, dtype=torch.float16)) == 12


def test_fused_kernel_moves_its_inputs_and_outputs_and_does_no_flops():
    model, inputs = models.get("relu_sigmoid").build()
    (cost,) = _costs(model, inputs)
    assert cost.kernel.startswith("fxopt_relu_sigmoid") and cost.op == "fused"
    assert cost.bytes == 2 * 1024 * 4 and cost.flops == 0


def test_gemm_flops_and_weights_count():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(8, 64)
    costs = _costs(model, (x,))
    assert sum(c.flops for c in costs) == 2 * 8 * (64 * 32 + 32 * 16)
    first = costs[0]  # Linear + ReLU as one _addmm_activation (fxopt's epilogue pass): x, weight, bias, output
    assert first.flops == 2 * 8 * 64 * 32
    assert first.bytes == 4 * (8 * 64 + 32 * 64 + 32 + 8 * 32)


def test_fused_conv_flop_formula():
    conv = floor._flop_formulas()[torch.ops.aten.cudnn_convolution_relu]
    flops = conv((1, 3, 32, 32), (32, 3, 3, 3), (32,), [1, 1], [1, 1], [1, 1], 1, out_shape=(1, 32, 32, 32))
    assert flops == 2 * 32 * 32 * 32 * 3 * 9


def test_compute_floor_sums_the_roofline_and_the_launch_floor():
    costs = [floor.NodeCost("a", "fused", "k", bytes=2_000_000, flops=0),  # 1 µs at 2000 GB/s
             floor.NodeCost("b", "addmm", None, bytes=1000, flops=200_000_000)]  # 4 µs at 50 TFLOP/s
    f = floor.compute_floor(costs, _limits(), kernels=3)
    assert f["available"] and f["reason"] is None
    assert f["roofline_us"] == pytest.approx(1.0 + 4.0)
    assert f["launch_us"] == pytest.approx(3 * 1.5)
    assert f["total_us"] == pytest.approx(9.5)
    assert [n["bound"] for n in f["nodes"]] == ["memory", "compute"]
    off = floor.compute_floor(costs, None, kernels=None)
    assert not off["available"] and off["total_us"] is None and "CUDA" in off["reason"]
    assert off["bytes"] == 2_001_000 and off["flops"] == 200_000_000


def test_device_limits_are_none_off_cuda():
    assert floor.device_limits(torch.device("cpu")) is None


def test_measured_limits_are_cached(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return _limits()

    path = tmp_path / "report" / "limits.json"
    first = floor.cached_limits(path, measure)
    again = floor.cached_limits(path, measure)
    assert len(calls) == 1 and first.source == "measured" and again.source == "cache"
    assert again.bandwidth_gbps == 2000.0 and "source" not in json.loads(path.read_text())
    floor.cached_limits(path, measure, refresh=True)
    path.write_text("{not json")
    assert floor.cached_limits(path, measure).source == "measured"
    assert len(calls) == 3


def test_calibration_cache_lives_in_fxopts_cache_dir():
    path = floor._calibration_path("NVIDIA H100", torch.float32)
    assert str(path).startswith(os.environ["FXOPT_CACHE_DIR"])
    assert path != floor._calibration_path("NVIDIA H100", torch.float16)
    assert path != floor._calibration_path("NVIDIA H200", torch.float32)


def test_split_launches_among_nodes_sharing_a_kernel():
    # two nodes call one kernel, one launch each per forward, 2 forwards: a1 b1 a2 b2
    assert floor.split_launches([1.0, 2.0, 1.5, 2.5], nodes=2, repeats=2) == [[1.0, 1.5], [2.0, 2.5]]
    assert floor.split_launches([1.0, 2.0, 3.0], nodes=2, repeats=2) is None
    assert floor.split_launches([], nodes=1, repeats=2) is None


def test_quiet_profiler_drops_kineto_lines_only():
    code = ("import os, sys\n"
            "from fxopt.report.measure import quiet_profiler\n"
            "with quiet_profiler():\n"
            "    os.write(2, b'STAGE:2026-11-23 20:03:21 7960:7960 SyncActivityProfilerHandler.cpp:51] Completed '\n"
            "                b'Stage: Warm Up\\nsomething else\\n')\n"
            "    print('from python', file=sys.stderr)\n")
    # Python warnings (torch warns at import when numpy is missing, as in CI) are not what this test is about
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "something else\nfrom python\n"
