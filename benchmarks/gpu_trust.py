"""Can the GPU results be trusted? One time-boxed run: the 2026-12-01 illegal address bisected by variant, and
compute-sanitizer over the CUDA tests.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_trust.py [--out DIR] [--budget-s 450] [--skip repro,memcheck,racecheck]
    python benchmarks/gpu_trust.py --list        # the variants and what each hypothesis predicts (no GPU needed)

Writes at most 7 files under ``--out`` (default ``$OUT``, else ``./out``) and prints a compact summary last:

  gpu_trust_summary.txt   the summary printed at the end (environment, sanitizer found, variant table, verdicts)
  gpu_trust.json          the same, structured
  setup.log               nvidia-smi, compute-sanitizer --version, the warm-up child
  repro.log               every variant child's output (STEP lines say where it was)
  repro_followup.log      the first failing variant again under CUDA_LAUNCH_BLOCKING=1 and under memcheck
  memcheck_tests.log      compute-sanitizer --tool memcheck over the cuda-marked tests (graph tests first)
  racecheck_tests.log     compute-sanitizer --tool racecheck over the generated-kernel tests

Sections run side by side once the sanitizer is found (it only slows its own processes): the repro variants (4 at a
time, one subprocess each, so a crash never takes the run down), memcheck over the CUDA tests, racecheck over the
generated-kernel tests. Every subprocess has a deadline inside ``--budget-s`` (SIGINT first, so pytest and the
sanitizer print their summaries, then SIGKILL). Expected: ~1.5 min for the variants, the sanitizer lanes use what is
left of the budget (memcheck runs the graph tests first; the rest of the suite only if time remains).

Reading the variant table (benchmarks/NOTES.md, "An illegal address when reduce-overhead is profiled ..."):
``ok`` ran clean; ``CRASH@step`` raised (or died) in that step; every step ends with a synchronize, so a fault is
charged to the step that launched it; ``WRONG`` ran but gave values off eager's; ``WROTE n`` (probes) means fxopt's
graph wrote n sentinel elements of memory it does not own. ``ws_off`` variants switch fxopt's cuBLAS workspace
clearing off (NOTE [cuBLAS workspaces in graphs]), which is how the failing 18:09-18:25 code captured. The verdict
lines say, per hypothesis, how many variants came out as it predicts (``--list`` prints the predictions).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "GPU_TRUST_RESULT "
STEP_TAG = "GPU_TRUST_STEP "
CUPTI_WORKAROUND = {"TEARDOWN_CUPTI": "0", "DISABLE_CUPTI_LAZY_REINIT": "1"}

# -- the variants ---------------------------------------------------------------------------------------------------
# scenario "bench": the failing bench_cudagraphs sequence (hand graph, profiles, fxopt graphs, graph_io=False, unsafe
# runner, then the event, then every system replayed in the bench's order; the bare replay is the "bare" scenario).
# "clear": capture, then the event, fxopt's graphs replayed first. "probe": sentinel over the freed workspaces.
# "bare": a bare CUDAGraph.replay() whose output copy node points at a freed (or kept) 16 MiB output.
_BENCH = {"scenario": "bench", "model": "cnn", "ws": "fxopt", "prof": True, "event": "ro"}
VARIANTS: list[dict] = [
    {**_BENCH, "name": "bench_head", "doc": "the failing sequence on this tree's code"},
    {**_BENCH, "name": "bench_ws_off", "ws": "off", "doc": "as the 18:09 code captured (no workspace clearing)"},
    {**_BENCH, "name": "bench_ws_off_noprof", "ws": "off", "prof": False, "doc": "no torch.profiler session"},
    {**_BENCH, "name": "bench_ws_off_cupti0", "ws": "off", "env": CUPTI_WORKAROUND,
     "doc": "torch's CUPTI workaround, which it skips for CUDA >= 12.6"},
    {**_BENCH, "name": "bench_ws_off_noro", "ws": "off", "event": "none", "doc": "profiler sessions, no r-o"},
    {**_BENCH, "name": "bench_head_noprof", "prof": False, "doc": "this tree, no profiler"},
    {"scenario": "clear", "model": "cnn", "ws": "off", "event": "clear", "name": "clear_cnn_ws_off",
     "doc": "no torch.compile: clear cuBLAS workspaces + empty_cache, as an r-o recording does"},
    {"scenario": "clear", "model": "cnn", "ws": "fxopt", "event": "clear", "name": "clear_cnn_head", "doc": ""},
    {"scenario": "clear", "model": "wide", "ws": "off", "event": "clear", "name": "clear_wide_ws_off",
     "doc": "GEMMs 8x16384 @ 16384x64 (split-K: they use the workspace)"},
    {"scenario": "clear", "model": "wide", "ws": "fxopt", "event": "clear", "name": "clear_wide_head", "doc": ""},
    {"scenario": "clear", "model": "wide", "ws": "off", "event": "ro", "name": "ro_wide_ws_off",
     "doc": "the real r-o recording as the event, no profiler"},
    {"scenario": "clear", "model": "wide", "ws": "fxopt", "event": "ro", "name": "ro_wide_head", "doc": ""},
    {"scenario": "probe", "model": "cnn", "ws": "off", "name": "probe_cnn_ws_off",
     "doc": "do SimpleCNN's batch-1 GEMMs use the workspace at all?"},
    {"scenario": "probe", "model": "wide", "ws": "off", "name": "probe_wide_ws_off", "doc": ""},
    {"scenario": "probe", "model": "wide", "ws": "fxopt", "name": "probe_wide_head", "doc": ""},
    {"scenario": "bare", "model": "big", "ws": "fxopt", "keep": False, "name": "bare_freed_big",
     "doc": "bare replay, output copy node aimed at a freed output (bench before 18:26)"},
    {"scenario": "bare", "model": "big", "ws": "fxopt", "keep": True, "name": "bare_kept_big", "doc": "control"},
    {**_BENCH, "name": "hand_only", "fxopt": False, "doc": "no fxopt at all: hand graph + profiles + r-o"},
]
# Hypotheses and what each predicts per variant: "bad" (crash, wrong values, sentinel written), "ok", or "bad_if_cnn"
# (bad exactly when probe_cnn_ws_off shows SimpleCNN's GEMMs writing the workspace). Unlisted variants: no prediction.
HYPOTHESES = {
    "H1 stale cuBLAS workspace (freed by r-o's clear_cublas_manager, unmapped by torch.cuda.graph's empty_cache)": {
        "bench_head": "ok", "bench_ws_off": "bad_if_cnn", "bench_ws_off_noprof": "bad_if_cnn",
        "bench_ws_off_cupti0": "bad_if_cnn", "bench_ws_off_noro": "ok", "bench_head_noprof": "ok",
        "clear_cnn_ws_off": "bad_if_cnn", "clear_cnn_head": "ok", "clear_wide_ws_off": "bad", "clear_wide_head": "ok",
        "ro_wide_ws_off": "bad", "ro_wide_head": "ok", "probe_wide_ws_off": "bad", "probe_wide_head": "ok"},
    "H2 CUPTI teardown/re-init after profiling graphs (torch skips its workaround on CUDA >= 12.6)": {
        "bench_head": "bad", "bench_ws_off": "bad", "bench_ws_off_noprof": "ok", "bench_ws_off_cupti0": "ok",
        "bench_head_noprof": "ok", "clear_cnn_ws_off": "ok", "clear_wide_ws_off": "ok", "ro_wide_ws_off": "ok",
        "hand_only": "bad"},
    "H3 bare replay writes the last call's freed output (graph_io output node)": {
        "bare_freed_big": "bad", "bare_kept_big": "ok"},
    "H4 torch-level: the bench's own hand graph / r-o, fxopt not needed": {
        "hand_only": "bad", "clear_cnn_ws_off": "ok", "clear_wide_ws_off": "ok", "bench_head": "bad"},
}
FOLLOWUP_ORDER = ["bench_head", "bench_ws_off", "ro_wide_ws_off", "clear_wide_ws_off", "clear_cnn_ws_off", "hand_only",
                  "bench_ws_off_noprof", "bare_freed_big"]


# -- the child: one variant in one process --------------------------------------------------------------------------
def _child(spec: dict) -> dict:
    import torch

    res: dict = {"name": spec["name"], "steps": [], "max_rel_err": {}, "wrong": []}
    if not torch.cuda.is_available():
        return {**res, "status": "skipped", "error": "CUDA is not available"}
    import fxopt
    from fxopt.runtime import cudagraph, native

    native.wait(timeout=180)
    res["native"] = native.status()
    if spec.get("ws") == "off":  # the capture keeps the warm-up stream's workspace (general allocator)
        cudagraph.TorchCUDABackend.clear_blas_workspaces = lambda self, device: None
    use_fxopt = spec.get("fxopt", True)
    ws_bytes = _workspace_bytes(torch)
    res["workspace_bytes"] = ws_bytes
    model, x = _build(spec["model"])
    current = ["start"]

    def step(name, fn):
        current[0] = name
        print(STEP_TAG + name, flush=True)
        out = fn()
        torch.cuda.synchronize()
        res["steps"].append(name)
        return out

    def check(name, got, want):
        got, want = got.float(), want.float()
        err = float((got - want).abs().max()) / (float(want.abs().max()) + 1e-6)
        res["max_rel_err"][name] = err
        if not err <= 2e-2:  # TF32 convolutions and reordered GEMMs stay far under this; NaN fails
            res["wrong"].append(name)

    try:
        with torch.no_grad():
            want = step("eager reference", lambda: model(x).clone())
            if spec["scenario"] == "bench":
                _bench(spec, torch, fxopt, model, x, want, step, check, use_fxopt)
            elif spec["scenario"] == "clear":
                _clear(spec, torch, fxopt, model, x, want, step, check)
            elif spec["scenario"] == "probe":
                res.update(_probe(torch, fxopt, model, x, want, step, check, ws_bytes))
            elif spec["scenario"] == "bare":
                _bare(spec, torch, fxopt, model, x, want, step, check, res)
        res["status"] = "WRONG" if res["wrong"] or res.get("sentinel_overwritten") else "ok"
        if res["status"] == "ok" and (res.get("sentinels_on_freed_workspaces") == 0
                                      or res.get("freed_output_unmapped") is False
                                      or res.get("output_copy_nodes") == 0):
            res["status"] = "inconclusive"  # the setup did not reach the state the variant tests
    except BaseException as e:  # noqa: BLE001 -- the parent classifies it; a sticky CUDA error ends the process
        res["status"] = "CRASH"
        res["failed_step"] = current[0]
        res["error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
        res["traceback_tail"] = traceback.format_exc()[-1500:]
    return res


def _workspace_bytes(torch) -> int:
    """The cuBLAS workspace one stream's first GEMM allocates (32 MiB on Hopper with torch 2.11)."""
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    a, w = torch.randn(64, 256, device="cuda"), torch.randn(256, 256, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.cuda.stream(torch.cuda.Stream()):
        y = a @ w
    torch.cuda.synchronize()
    got = torch.cuda.memory_allocated() - before - y.untyped_storage().nbytes()
    del y
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.synchronize()
    return got if got > 0 else 32 << 20


def _build(kind: str):
    import torch
    from torch import nn

    if kind == "cnn":  # what bench_cudagraphs ran first, and failed on
        from fxopt.models import build_any

        model, (x,) = build_any("simple_cnn", "cuda")
        return model, x
    torch.manual_seed(0)
    if kind == "wide":  # tiny M and N, long K: cuBLAS picks split-K kernels, which use the workspace
        model = nn.Sequential(nn.Linear(16384, 64), nn.ReLU(), nn.Linear(64, 16))
        return model.cuda().eval(), torch.randn(8, 16384, device="cuda")
    if kind == "big":  # one fused elementwise kernel with a 16 MiB output: its own segment once freed
        return nn.Sequential(nn.ReLU(), nn.Sigmoid()).cuda().eval(), torch.randn(4 << 20, device="cuda")
    raise ValueError(f"unknown model kind {kind!r}")


def _hand_graph(torch, model, x):
    """bench_cudagraphs.hand_captured: warm-up on a side stream, torch.cuda.graph (which empties the cache)."""
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(static)

    def run(x):
        static.copy_(x)
        graph.replay()
        return out

    return run


def _profile(torch, fn) -> int:
    """bench_cudagraphs.kernel_profile: one call under torch.profiler with CUDA activity; its CUDA events."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _calls(fn, x, n):
    for _ in range(n):
        fn(x)


def _first_graph(opt):
    return next(e for e in opt._graphs._entries.values() if e.graphs).graphs[0]


def _event(spec, torch, model, x, step):
    if spec["event"] == "ro":
        def record():
            torch._dynamo.reset()
            compiled = torch.compile(model, mode="reduce-overhead")
            for _ in range(3):
                compiled(x)
            return compiled

        compiled = step("reduce-overhead: compile, warm up, record", record)
        step("reduce-overhead: 100 calls", lambda: _calls(compiled, x, 100))
        if spec.get("prof"):
            step("profile reduce-overhead", lambda: _profile(torch, lambda: compiled(x)))
        return compiled
    if spec["event"] == "clear":
        def clear():
            torch._C._cuda_clearCublasWorkspaces()  # torch._inductor.cudagraph_trees.clear_cublas_manager
            torch.cuda.empty_cache()  # torch.cuda.graph.__enter__, around every r-o recording

        step("clear cuBLAS workspaces + empty_cache", clear)
    return None


def _bench(spec, torch, fxopt, model, x, want, step, check, use_fxopt):
    prof = spec.get("prof")
    hand = step("hand graph: capture (torch.cuda.graph)", lambda: _hand_graph(torch, model, x))
    check("hand graph", hand(x).clone(), want)
    if prof:
        step("profile hand graph", lambda: _profile(torch, lambda: hand(x)))
    systems = {"eager": model, "hand graph": hand}
    if use_fxopt:
        systems["fxopt"] = step("fxopt without graphs: optimize", lambda: fxopt.optimize(model, [x]))
        g = step("fxopt graphs: optimize + 3 calls", lambda: _opt_and_call(fxopt, model, x, {}))
        check("fxopt graphs", g(x), want)
        if prof:
            step("profile fxopt graphs", lambda: _profile(torch, lambda: g(x)))
        step("fxopt graphs: 300 calls, outputs dropped", lambda: _calls(g, x, 300))
        g_out = step("fxopt graph_io=False: optimize + 300 calls",
                     lambda: _opt_and_call(fxopt, model, x, {"graph_io": False}, 300))
        unsafe = step("fxopt unsafe: optimize (captured at its first call, later)",
                      lambda: fxopt.optimize(model, [x], cuda_graphs=True, graph_options={"output_mode": "unsafe"}))
        systems.update({"fxopt graphs": g, "fxopt graph_io=False": g_out, "fxopt unsafe (first capture)": unsafe})
    compiled = _event(spec, torch, model, x, step)
    if compiled is not None:
        systems["reduce-overhead"] = compiled
    for name, fn in systems.items():  # the bench's order (measure_interleaved's warm-up); the first replay of each
        outs = step(f"after: {name} x20", lambda fn=fn: [fn(x).clone() for _ in range(20)])
        check(f"after: {name}", outs[-1], want)


def _opt_and_call(fxopt, model, x, options, n=3):
    g = fxopt.optimize(model, [x], cuda_graphs=True, graph_options=options)
    _calls(g, x, n)
    return g


def _clear(spec, torch, fxopt, model, x, want, step, check):
    g = step("fxopt graphs: optimize + 3 calls", lambda: _opt_and_call(fxopt, model, x, {}))
    check("fxopt graphs", g(x), want)
    g_out = step("fxopt graph_io=False: optimize + 3 calls",
                 lambda: _opt_and_call(fxopt, model, x, {"graph_io": False}))
    _event(spec, torch, model, x, step)
    for name, fn in (("fxopt graphs", g), ("fxopt graph_io=False", g_out)):  # first, before anything allocates
        outs = step(f"after: {name} x20", lambda fn=fn: [fn(x).clone() for _ in range(20)])
        check(f"after: {name}", outs[-1], want)


def _probe(torch, fxopt, model, x, want, step, check, ws_bytes) -> dict:
    """Free every cuBLAS workspace, put sentinels of the workspace's size on the runner's streams (the allocator
    hands them the freed blocks), replay: any sentinel element changed was written by the graph."""
    from fxopt.runtime import streams as fx_streams

    g = step("fxopt graphs: optimize + 3 calls", lambda: _opt_and_call(fxopt, model, x, {}))
    check("fxopt graphs", g(x), want)
    side = list(g._graphs._side_streams.values()) + list(fx_streams._side_streams.values())
    torch.cuda.synchronize()

    def live_workspaces():
        return {b["address"] for s in torch.cuda.memory_snapshot() for b in s.get("blocks", [])
                if b.get("state") == "active_allocated" and b.get("requested_size", b.get("size")) == ws_bytes}

    candidates = live_workspaces()
    torch._C._cuda_clearCublasWorkspaces()
    hogs = []
    for s in side + [torch.cuda.current_stream()]:
        with torch.cuda.stream(s):
            hogs += [torch.full((ws_bytes // 4,), 7.0, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    on_workspace = sum(h.data_ptr() in candidates for h in hogs)
    outs = step("fxopt graphs: 20 calls over the sentinels", lambda: [g(x).clone() for _ in range(20)])
    check("fxopt graphs over sentinels", outs[-1], want)
    written = sum(int((h != 7.0).sum()) for h in hogs)
    return {"sentinel_overwritten": written, "sentinels_on_freed_workspaces": on_workspace,
            "freed_workspaces": len(candidates), "side_streams": len(side)}


def _bare(spec, torch, fxopt, model, x, want, step, check, res):
    g = step("fxopt graphs: optimize + 3 calls", lambda: _opt_and_call(fxopt, model, x, {}))
    graph = _first_graph(g)
    res["output_copy_nodes"] = sum(len(e.io_outputs) for e in g._graphs._entries.values())
    kept = g(x)
    check("fxopt graphs", kept, want)
    address = kept.data_ptr()
    if not spec.get("keep"):
        del kept
    step("empty_cache (the freed output's segment goes back to the driver)", torch.cuda.empty_cache)
    mapped = any(s["address"] <= address < s["address"] + s["total_size"] for s in torch.cuda.memory_snapshot())
    if not spec.get("keep"):
        res["freed_output_unmapped"] = not mapped  # set before the replay that may crash
    step("bare CUDAGraph.replay() x50", lambda: [graph.replay() for _ in range(50)])


# -- the parent: subprocesses with deadlines ------------------------------------------------------------------------
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()
_FILE_LOCK = threading.Lock()


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile worker pools (several children, sanitizer)
    env.update(extra or {})
    return env


def _run(cmd: list[str], timeout: float, env: dict, log: Path | None = None, header: str = "") -> dict:
    """Run ``cmd`` in its own process group; at the deadline SIGINT (pytest and the sanitizer print their summaries),
    20 s later SIGKILL. Returns rc, seconds, timed_out and the output (also appended to ``log``)."""
    t0 = time.time()
    if timeout <= 5:
        return {"rc": None, "seconds": 0.0, "timed_out": True, "output": "(not run: no time left)\n"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(65536), b"")), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)  # the group's stragglers too (they may hold the output pipe)
        proc.wait()
    reader.join(timeout=10)
    with _LIVE_LOCK:
        _LIVE.discard(proc)
    out = b"".join(chunks).decode(errors="replace")
    seconds = time.time() - t0
    if log is not None:
        with _FILE_LOCK, open(log, "a") as f:
            f.write(f"\n{'=' * 100}\n== {header}\n== $ {' '.join(cmd)}\n== rc={proc.returncode} "
                    f"seconds={seconds:.1f} timed_out={timed_out}\n{'=' * 100}\n")
            f.write(_trim(out, 6 << 20))
    return {"rc": proc.returncode, "seconds": round(seconds, 1), "timed_out": timed_out, "output": out}


def _signal_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group of a process this script started (start_new_session)
    except ProcessLookupError:
        pass


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 8
    return text[:head] + f"\n... [{len(text) - limit} characters cut] ...\n" + text[-(limit - head):]


def find_sanitizers() -> list[dict]:
    """Every compute-sanitizer binary this machine has: PATH, CUDA_HOME, /usr/local/cuda*, /opt, pip's nvidia
    packages (nvidia-cuda-sanitizer-api, cuda-toolkit); each with where it was found and its --version line."""
    seen, found = set(), []

    def add(where: str, path: str) -> None:
        real = os.path.realpath(path)
        if real in seen or not (os.path.isfile(real) and os.access(real, os.X_OK)):
            return
        seen.add(real)
        try:
            p = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=30)
            version = next((ln.strip() for ln in p.stdout.splitlines() if "ersion" in ln), p.stdout.strip()[:80])
            works = p.returncode == 0
        except (OSError, subprocess.TimeoutExpired) as e:
            version, works = f"{type(e).__name__}: {e}", False
        found.append({"where": where, "path": path, "version": version, "works": works})

    if shutil.which("compute-sanitizer"):
        add("PATH", shutil.which("compute-sanitizer"))
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            for sub in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
                add(f"${var}", os.path.join(os.environ[var], sub))
    for pattern in ("/usr/local/cuda*/bin/compute-sanitizer", "/usr/local/cuda*/compute-sanitizer/compute-sanitizer",
                    "/opt/cuda*/bin/compute-sanitizer", "/opt/nvidia/*/compute-sanitizer",
                    "/opt/nvidia/*/*/compute-sanitizer", "/usr/bin/compute-sanitizer"):
        for path in sorted(glob.glob(pattern)):
            add(f"glob {pattern}", path)
    try:
        import importlib.metadata as md

        for dist in md.distributions():
            name = (dist.metadata["Name"] or "").lower()
            if "sanitizer" in name or name.startswith(("cuda-toolkit", "nvidia-cuda-toolkit")):
                for f in dist.files or []:
                    if f.name == "compute-sanitizer":
                        add(f"pip {name} {dist.version}", str(f.locate()))
    except Exception as e:  # noqa: BLE001 -- discovery only: say why and go on
        found.append({"where": "pip scan failed", "path": "", "version": f"{type(e).__name__}: {e}", "works": False})
    try:
        import nvidia  # type: ignore[import-not-found]

        for base in list(getattr(nvidia, "__path__", [])):
            for path in glob.glob(os.path.join(base, "**", "compute-sanitizer"), recursive=True):
                add("site-packages/nvidia", path)
    except ImportError:
        pass
    return found


_SUMMARY_RES = {
    "memcheck": re.compile(r"ERROR SUMMARY: (\d+) errors?"),
    "racecheck": re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)"),
    "pytest": re.compile(r"^=*\s*((?:\d+ (?:passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)"
                         r",?\s*)+) in [0-9.]+s", re.MULTILINE),
}


def parse_sanitizer(text: str) -> dict:
    """The summary lines and the first distinct findings of a compute-sanitizer log."""
    out: dict = {"summaries": [], "pytest": None, "kinds": {}, "kernels": [], "first_findings": []}
    for m in re.finditer(r"^.*(?:ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY).*$", text, re.MULTILINE):
        out["summaries"].append(m.group(0).replace("=========", "").strip())
    errors = [int(m.group(1)) for m in _SUMMARY_RES["memcheck"].finditer(text)]
    out["errors_total"] = sum(errors) if errors else None
    hazards = [tuple(map(int, m.groups())) for m in _SUMMARY_RES["racecheck"].finditer(text)]
    out["hazards_total"] = sum(h[0] for h in hazards) if hazards else None
    pm = _SUMMARY_RES["pytest"].findall(text)
    out["pytest"] = pm[-1].strip().rstrip(",") if pm else None
    if out["pytest"] is None:  # cut off: count pytest -q's progress characters
        prog = "".join(ln.split(" [")[0].strip() for ln in text.splitlines()
                       if re.fullmatch(r"[.FEsxX]+(\s+\[\s*\d+%\])?", ln.strip()))
        out["pytest_progress"] = {c: prog.count(c) for c in ".FEsxX" if prog.count(c)}
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        body = ln.replace("=========", "").strip()
        m = re.match(r"(Invalid __\w+__ \w+|Program hit \w+|Race reported between|Error: [^\n]{0,80}|"
                     r"Malloc/Free error|Barrier error|Cuda API error)", body)
        if not m:
            continue
        kind = m.group(1)[:60]
        out["kinds"][kind] = out["kinds"].get(kind, 0) + 1
        nxt = next((y for y in (x.replace("=========", "").strip() for x in lines[i + 1:i + 4]) if y.startswith("at ")),
                   "")
        if nxt and nxt not in out["kernels"] and len(out["kernels"]) < 8:
            out["kernels"].append(nxt[:200])
        if len(out["first_findings"]) < 6:
            out["first_findings"].append(" | ".join(x.replace("=========", "").strip()
                                                    for x in lines[i:i + 4])[:400])
    return out


def _result_of(name: str, run: dict) -> dict:
    line = next((ln for ln in reversed(run["output"].splitlines()) if ln.startswith(RESULT_TAG)), None)
    steps = [ln[len(STEP_TAG):] for ln in run["output"].splitlines() if ln.startswith(STEP_TAG)]
    if line is not None:
        res = json.loads(line[len(RESULT_TAG):])
    else:  # died without a result: segfault, abort, killed
        err = next((ln.strip() for ln in run["output"].splitlines()
                    if re.search(r"error|Error|illegal|Segmentation|Aborted|core dumped", ln)), "")
        res = {"name": name, "status": "TIMEOUT" if run["timed_out"] else "CRASH",
               "failed_step": steps[-1] if steps else "start", "error": f"rc={run['rc']} {err[:300]}"}
    if run["timed_out"]:  # the deadline's SIGINT shows as a KeyboardInterrupt in the child
        res["status"] = "TIMEOUT"
    res.update({"rc": run["rc"], "seconds": run["seconds"]})
    return res


def _bad(res: dict | None) -> bool | None:
    if res is None or res.get("status") in (None, "skipped", "TIMEOUT", "inconclusive"):
        return None
    return res["status"] != "ok"


def verdicts(results: dict) -> list[str]:
    cnn_uses_ws = _bad(results.get("probe_cnn_ws_off"))
    lines = []
    for hyp, preds in HYPOTHESES.items():
        agree, mismatches, n = 0, [], 0
        for var, pred in preds.items():
            got = _bad(results.get(var))
            if got is None:
                continue
            if pred == "bad_if_cnn":
                if cnn_uses_ws is None:
                    continue
                pred = "bad" if cnn_uses_ws else "ok"
            n += 1
            if got == (pred == "bad"):
                agree += 1
            else:
                mismatches.append(f"{var} expected {pred}, got {results[var]['status']}")
        lines.append(f"{hyp}: {agree}/{n} variants as predicted" + (f"; against: {'; '.join(mismatches)}"
                                                                    if mismatches else ""))
    return lines


def _describe(res: dict) -> str:
    s = res.get("status", "?")
    if s == "CRASH":
        return f"CRASH@{res.get('failed_step', '?')}: {res.get('error', '')[:160]}"
    if "sentinel_overwritten" in res:
        extra = (f"WROTE {res['sentinel_overwritten']} sentinel elements" if res["sentinel_overwritten"]
                 else "no sentinel written") + (f" ({res.get('sentinels_on_freed_workspaces')} sentinels on "
                                                f"{res.get('freed_workspaces')} freed workspaces)")
        return f"{s}: {extra}" + (f"; wrong: {res['wrong']}" if res.get("wrong") else "")
    if s == "WRONG":
        return f"WRONG: {', '.join(res.get('wrong', []))} (max rel err " + \
            ", ".join(f"{k} {v:.2g}" for k, v in res.get("max_rel_err", {}).items() if k in res.get("wrong", [])) + ")"
    return s if s != "TIMEOUT" else f"TIMEOUT@{res.get('failed_step', '?')}"


def _repro_lane(args, deadline: float, out: Path, summary: dict) -> None:
    log = out / "repro.log"
    variants = [v for v in VARIANTS if not args.variants or v["name"] in args.variants.split(",")]
    results: dict = summary.setdefault("variants", {})

    def one(spec, extra_env=None, prefix=None, logfile=log, label=""):
        cmd = (prefix or []) + [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        left = deadline - time.time()
        run = _run(cmd, min(args.variant_timeout if not prefix else 240, left), _env({**spec.get("env", {}),
                                                                                     **(extra_env or {})}),
                   logfile, f"{label}{spec['name']}: {spec.get('doc', '')}")
        return run

    # the first alone: builds the native extension, fills the kernel and Inductor caches for the others
    for spec in variants[:1]:
        results[spec["name"]] = _result_of(spec["name"], one(spec))
        print(f"  {spec['name']:24s} {_describe(results[spec['name']])}", flush=True)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {spec["name"]: pool.submit(one, spec) for spec in variants[1:]}
        for name, fut in futures.items():
            results[name] = _result_of(name, fut.result())
            print(f"  {name:24s} {_describe(results[name])}", flush=True)
    # follow-ups on the first failing variant: where exactly (CUDA_LAUNCH_BLOCKING=1), and which access (memcheck)
    bad = [n for n in FOLLOWUP_ORDER if _bad(results.get(n))] + [n for n in results if _bad(results[n])]
    follow = summary.setdefault("followup", {})
    flog = out / "repro_followup.log"
    target = bad[0] if bad else (variants[0]["name"] if variants else None)
    if target is None:
        return
    spec = next(v for v in VARIANTS if v["name"] == target)
    if bad:
        run = one(spec, {"CUDA_LAUNCH_BLOCKING": "1"}, logfile=flog, label="CUDA_LAUNCH_BLOCKING=1 ")
        follow["launch_blocking"] = {"variant": target, **{k: v for k, v in _result_of(target, run).items()
                                                           if k in ("status", "failed_step", "error", "seconds")}}
        follow["launch_blocking"]["frames"] = [ln.strip() for ln in run["output"].splitlines()
                                               if re.match(r'\s*File ".*(fxopt|benchmarks|torch/cuda)', ln)][-6:]
    if summary.get("sanitizer") and "memcheck" not in args.skip:
        san = summary["sanitizer"]["path"]
        prefix = [san, "--tool", "memcheck", "--target-processes", "all", "--print-limit", "20"]
        run = one(spec, prefix=prefix, logfile=flog, label="memcheck ")
        follow["memcheck"] = {"variant": target, "result": _describe(_result_of(target, run)),
                              "seconds": run["seconds"], "timed_out": run["timed_out"],
                              **{k: v for k, v in parse_sanitizer(run["output"]).items()
                                 if k in ("summaries", "kinds", "kernels", "first_findings")}}


def _pytest_cmd(tool: str | None, san: str | None, targets: list[str], extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-x", "-q", "-p", "no:cacheprovider", *extra, *targets]
    if tool:
        cmd = [san, "--tool", tool, "--target-processes", "all", "--print-limit", "30"] + cmd
    return cmd


def _sanitizer_lane(tool: str, plan: list[tuple[str, list[str], list[str]]], deadline: float, out: Path,
                    summary: dict) -> None:
    san = summary["sanitizer"]["path"]
    log = out / f"{tool}_tests.log"
    runs = summary.setdefault(tool, [])
    for i, (label, targets, extra) in enumerate(plan):
        left = deadline - time.time()
        # a basetemp of its own: two pytest sessions at once must not clean up each other's temporary folders
        basetemp = f"--basetemp=/tmp/gpu_trust-{tool}-{i}-{os.getpid()}"
        run = _run(_pytest_cmd(tool, san, targets, [*extra, basetemp]), left, _env(), log, f"{tool}: {label}")
        parsed = parse_sanitizer(run["output"])
        runs.append({"label": label, "targets": targets, "rc": run["rc"], "seconds": run["seconds"],
                     "timed_out": run["timed_out"], **parsed})
        print(f"  {tool} {label}: {run['seconds']:.0f} s{' (cut at the deadline)' if run['timed_out'] else ''}; "
              f"pytest: {parsed['pytest'] or parsed.get('pytest_progress')}; {'; '.join(parsed['summaries'][-2:])}",
              flush=True)
        if run["rc"] is None:
            break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "out")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    parser.add_argument("--skip", default="", help="comma list of sections: repro, memcheck, racecheck")
    parser.add_argument("--variants", default="", help="comma list of variant names (default: all)")
    parser.add_argument("--workers", type=int, default=4, help="variant children at a time")
    parser.add_argument("--variant-timeout", type=float, default=150.0)
    parser.add_argument("--list", action="store_true", help="print the variants and the predictions, and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        res = _child(json.loads(args.child))
        print(RESULT_TAG + json.dumps(res, default=str), flush=True)
        sys.stdout.flush()
        os._exit(0 if res.get("status") in ("ok", "skipped") else 3)  # no teardown on a sticky CUDA error
    if args.list:
        for v in VARIANTS:
            print(f"{v['name']:24s} {v.get('doc', '')}")
        for hyp, preds in HYPOTHESES.items():
            print(f"\n{hyp}:\n  " + ", ".join(f"{k}={p}" for k, p in preds.items()))
        return 0
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t_start = time.time()
    deadline = t_start + args.budget_s - 20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("setup.log", "repro.log", "repro_followup.log", "memcheck_tests.log", "racecheck_tests.log"):
        (out / name).unlink(missing_ok=True)
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget_s}
    setup = out / "setup.log"
    print("== environment", flush=True)
    probe = ("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; "
             f"{shlex.quote(sys.executable)} -c 'import torch,sys; print(torch.__version__, torch.version.cuda,"
             " sys.version.split()[0], torch.cuda.is_available())'; git log --oneline -1 2>/dev/null;"
             " git status --short 2>/dev/null | head -20")
    env_run = _run(["/bin/sh", "-c", probe], 60, _env(), setup, "environment")
    summary["environment"] = env_run["output"].strip().splitlines()[:30]
    for ln in summary["environment"][:4]:
        print("  " + ln, flush=True)
    found = find_sanitizers()
    summary["sanitizers_found"] = found
    usable = [f for f in found if f["works"]]
    summary["sanitizer"] = usable[0] if usable else None
    with open(setup, "a") as f:
        f.write("\n== compute-sanitizer search\n" + json.dumps(found, indent=1) + "\n")
    print("== compute-sanitizer: " + (f"{usable[0]['path']} ({usable[0]['where']}; {usable[0]['version']})" if usable
                                      else f"not found ({len(found)} candidates, none runs)"), flush=True)
    lanes = []
    if summary["sanitizer"]:
        if "memcheck" not in args.skip:  # the graph tests first (the crash's neighbourhood), then the rest
            graph_tests = ["tests/gpu/test_cudagraph_gpu.py", "tests/gpu/test_native_graph_call_gpu.py"]
            plan = [("graph tests", graph_tests, []),
                    ("the other cuda-marked tests", ["tests"], [f"--ignore={t}" for t in graph_tests])]
            lanes.append(threading.Thread(target=_sanitizer_lane, args=("memcheck", plan, deadline, out, summary)))
        if "racecheck" not in args.skip:  # generated kernels: row kernels (shared memory) first, then elementwise
            elementwise = ["tests/codegen/test_cuda_source.py", "tests/passes/test_epilogue.py"]
            plan = [("row kernels", ["tests/gpu/test_fuse_reductions_gpu.py"], []),
                    ("fused elementwise kernels", elementwise, [])]
            lanes.append(threading.Thread(target=_sanitizer_lane, args=("racecheck", plan, deadline, out, summary)))
    else:
        summary["sanitizer_note"] = "no compute-sanitizer: memcheck and racecheck sections skipped"
    for lane in lanes:
        lane.start()
    try:
        if "repro" not in args.skip:
            print("== repro variants (one subprocess each)", flush=True)
            _repro_lane(args, deadline, out, summary)
        for lane in lanes:
            lane.join(max(0.0, deadline + 40 - time.time()))
    finally:
        with _LIVE_LOCK:
            for proc in list(_LIVE):
                _signal_group(proc, signal.SIGKILL)
    summary["seconds"] = round(time.time() - t_start, 1)
    summary["verdicts"] = verdicts(summary.get("variants", {}))
    text = _summary_text(summary)
    (out / "gpu_trust_summary.txt").write_text(text)
    (out / "gpu_trust.json").write_text(json.dumps(summary, indent=1, default=str))
    print(text, flush=True)
    return 0


def _summary_text(summary: dict) -> str:
    lines = [f"gpu_trust summary ({summary['seconds']} s of {summary['budget_s']:.0f})"]
    lines += ["  " + ln for ln in summary.get("environment", [])[:3]]
    san = summary.get("sanitizer")
    tried = "; ".join(f"{f['where']} {f['path']} {f['version']}" for f in summary.get("sanitizers_found", []))
    lines.append("compute-sanitizer: " + (f"{san['path']} ({san['where']}; {san['version']})" if san else
                                          "NOT FOUND in PATH, $CUDA_HOME, /usr/local/cuda*, /opt, pip's nvidia "
                                          f"packages ({tried or 'no candidate'})"))
    if summary.get("variants"):
        lines.append("repro variants:")
        for name, res in summary["variants"].items():
            lines.append(f"  {name:24s} {res.get('seconds', 0):5.0f} s  {_describe(res)}")
    for key, fol in summary.get("followup", {}).items():
        lines.append(f"follow-up {key} ({fol.get('variant')}): " + json.dumps({k: v for k, v in fol.items()
                                                                               if k != "variant"}, default=str)[:900])
    for tool in ("memcheck", "racecheck"):
        for run in summary.get(tool, []):
            lines.append(f"{tool} {run['label']}: {run['seconds']:.0f} s{' CUT' if run['timed_out'] else ''}, "
                         f"pytest: {run['pytest'] or run.get('pytest_progress')}; "
                         f"{'; '.join(run['summaries'][-3:]) or 'no summary line'}; kinds {run['kinds'] or '-'}")
            for k in run["kernels"][:4]:
                lines.append(f"    at: {k}")
    if summary.get("sanitizer_note"):
        lines.append(summary["sanitizer_note"])
    lines.append("verdicts (variants whose outcome matches each hypothesis's prediction):")
    lines += ["  " + v for v in summary.get("verdicts", [])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
