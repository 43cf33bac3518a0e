"""The report on a GPU: GPU kernels, busy time, peak memory, the floor with measured limits, per-kernel GPU time.
Run on the GPU machine: python -m pytest -m cuda tests/report"""

import json

import pytest

from fxopt.report import main

pytestmark = pytest.mark.cuda


def test_report_on_cuda_fills_the_gpu_columns_and_the_floor(tmp_path, capsys):
    assert main(["relu_sigmoid", "--device", "cuda", "--systems", "eager,torchscript,fxopt,fxopt_cudagraphs",
                 "--iters", "30", "--warmup", "5", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "relu_sigmoid-cuda.json").read_text())
    env = data["environment"]
    assert env["device_name"] and env["cuda"] and "capability" in env
    eager, fx = data["systems"]["eager"], data["systems"]["fxopt"]
    assert eager["launches"]["cuda_kernels"] == 2 and fx["launches"]["cuda_kernels"] == 1
    assert fx["launches"]["cuda_launch_calls"] >= 1 and fx["launches"]["gpu_busy_us"] > 0
    assert isinstance(fx["peak_memory_bytes"], int) and fx["peak_memory_bytes"] >= 4096
    floor = data["floor"]
    assert floor["available"], floor["reason"]
    limits = floor["limits"]
    assert limits["bandwidth_gbps"] > 100 and limits["peak_tflops"] > 1 and limits["graph_node_us"] > 0
    assert floor["total_us"] == pytest.approx(floor["roofline_us"] + floor["launch_us"])
    assert floor["kernels"] == 1 and fx["x_floor"] > 1
    kernel = data["kernels"]["fused"]
    assert kernel["gpu_us"] > 0 and kernel["launches_per_forward"] == 1
    assert kernel["achieved_gbps"] > 0 and 0 < kernel["fraction_of_peak_bandwidth"] < 2
    cg = data["systems"]["fxopt_cudagraphs"]
    assert cg["status"] == "ok" or "cuda_graphs" in (cg["error"] or ""), cg
    for name in ("compile", "compile_reduce_overhead", "fxopt_inductor", "tensorrt"):
        assert data["systems"][name]["status"] == "skipped"


def test_floor_counts_gemm_and_conv_flops_on_cuda(tmp_path, capsys):
    for model in ("mlp_block", "small_resnet"):
        assert main([model, "--device", "cuda", "--systems", "eager,fxopt", "--iters", "10", "--no-trace",
                     "--out", str(tmp_path)]) == 0
        data = json.loads((tmp_path / f"{model}-cuda.json").read_text())
        assert data["floor"]["available"] and data["floor"]["flops"] > 1e6, model
        assert data["systems"]["fxopt"]["max_rel_error"] < 1e-3
