"""Batch-1 autoregressive decoding (issue 19): tokens/s of eager, torch.compile(mode="reduce-overhead",
fullgraph=True), fxopt and fxopt + CUDA graphs on a decode step with a static KV cache (GPU machine).

    python benchmarks/bench_decode.py [--models plain,transformers] [--presets small,gpt2_small_size]
        [--dtypes bfloat16,float32] [--systems eager,compile,fxopt,fxopt_graphs[,fxopt_graphs_nopdl]] [--tokens 32]
        [--enable keep_faster_regions [--systems ...,fxopt_graphs_enabled]]
        [--rounds 10]
        [--reps 3] [--check-tokens 64] [--timeout-s 180] [--budget-s 420] [--device cuda] [--out DIR]

Models: ``plain`` is fxopt.models.decoder.Decoder (Llama layout, KV cache in buffers written with index_copy_ at a
position tensor); ``transformers`` is LlamaForCausalLM with the same sizes and a StaticCache allocated up front.
Every (model, preset, dtype) runs in its own child process (fresh Dynamo and CUDA state, killed after
``--timeout-s``); no child starts after ``--budget-s``. Each system has its own copy of the model (same weights,
its own cache). Per config:

* setup: fxopt.optimize's wall time and torch.compile's first call (a fresh process; the on-disk kernel caches
  as they are on the machine; fxopt_graphs is set up after fxopt and finds its kernels compiled), then
  ``ready_s``: setup + the first 3 decode steps (reduce-overhead records its CUDA graph in them, fxopt captures
  its graph at the first);
* correctness: greedy decoding of ``--check-tokens`` tokens against eager's (float32: must be identical), and
  the max |logits - eager's| with every system fed eager's tokens (teacher-forced), so bfloat16 shows fxopt's
  difference next to torch.compile's;
* GPU kernels per decode step (the step alone, not the argmax), from the profiler (``fxopt.count_launches``);
  on CPU the dispatched ATen ops instead;
* tokens/s: timed in ``--rounds`` rounds, every system once per round in rotated order (NOTE [Interleaved timing]
  in fxopt/report/measure.py); per round each system decodes ``--tokens`` tokens from position 0, ``--reps``
  times (the cache reset between, untimed; the time ends when the tokens are on the host); tokens/s = the median
  of the per-round medians, and the speedup over eager the median of the per-round ratios.

Writes DIR/bench_decode.json (the environment and every row) and DIR/bench_decode.md; children's logs go to
DIR/bench_decode_logs/. On CPU: ``--device cpu --presets small --dtypes float32 --tokens 8 --systems eager,fxopt``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from tabulate import tabulate

SYSTEMS = ("eager", "compile", "fxopt", "fxopt_graphs")
# fxopt + CUDA graphs without programmatic edges (NOTE [Programmatic dependent launch]): asked for by name, for the
# same graph with and without them in one process
# fxopt_graphs_enabled: fxopt + CUDA graphs with the --enable passes; when it is asked for, the other fxopt systems
# run without them, so one process times the graph with and without the opt-in passes
# fxopt_graphs_disabled: fxopt + CUDA graphs without the --disable passes (the others keep them): a default pass's
# effect measured in one process
GRAPH_SYSTEMS = ("fxopt_graphs", "fxopt_graphs_nopdl", "fxopt_graphs_enabled", "fxopt_graphs_disabled")
ALL_SYSTEMS = SYSTEMS + ("fxopt_graphs_nopdl", "fxopt_graphs_enabled", "fxopt_graphs_disabled")
FIRST_TOKEN = 3


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1000]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the child: one (model, preset, dtype) --------------------------------------------------------------------------
class _Row(dict):
    """The config's results, saved to ``path`` at every stage: the parent reads what got measured if the child dies."""

    def __init__(self, path: str | None, **fields):
        super().__init__(fields)
        self.path, self.t0 = path, time.perf_counter()

    def stage(self, name: str) -> None:
        self["stage"] = name
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {name}", file=sys.stderr, flush=True)
        if self.path:
            with open(self.path + ".tmp", "w") as f:
                json.dump(self, f, default=str)
            os.replace(self.path + ".tmp", self.path)


def _build_systems(args, device: torch.device, dtype: torch.dtype, row: _Row) -> dict[str, tuple[Any, Any]]:
    """name -> (the decode step to call, the model whose cache it writes); each system's setup timed into ``row``."""
    import fxopt
    from fxopt.models.decoder import build_step, greedy_generate

    first = torch.tensor([[FIRST_TOKEN]], device=device)
    pos = torch.tensor([0], device=device)
    eager = build_step(args.model, args.preset, dtype, device)
    systems: dict[str, tuple[Any, Any]] = {"eager": (eager, eager)}
    setup: dict[str, dict] = {}
    row["setup"] = setup
    for name in [s for s in args.systems if s != "eager"]:
        if name in GRAPH_SYSTEMS and device.type != "cuda":
            setup[name] = {"skipped": "CUDA graphs need a GPU"}
            continue
        row.stage(f"setting up {name}")
        model = build_step(args.model, args.preset, dtype, device)
        info: dict[str, Any] = {}
        setup[name] = info
        try:
            t0 = time.perf_counter()
            if name == "compile":
                from fxopt.report.compiled import dynamo_stats, record_cudagraph_skips

                fn = torch.compile(model, mode="reduce-overhead", fullgraph=True)
                with record_cudagraph_skips() as skips:
                    t1 = time.perf_counter()
                    greedy_generate(fn, first, 0, 1)
                    info["first_call_s"] = time.perf_counter() - t1
                    greedy_generate(fn, first, 1, 2)
            else:
                graphs = name in GRAPH_SYSTEMS
                enable = [p for p in args.enable.split(",") if p]
                if "fxopt_graphs_enabled" in args.systems and name != "fxopt_graphs_enabled":
                    enable = []
                disable = [p for p in args.disable.split(",") if p] if name == "fxopt_graphs_disabled" else []
                fn = fxopt.optimize(model, (first, pos), cuda_graphs=graphs, graph_options={
                    "programmatic_launch": name != "fxopt_graphs_nopdl"} if graphs else None, enable=enable,
                    disable=disable)
                info["enable"] = ",".join(enable)
                info["disable"] = ",".join(disable)
                info["optimize_s"] = time.perf_counter() - t0
                info["unoptimized_reason"] = fn.unoptimized_reason
                t1 = time.perf_counter()
                greedy_generate(fn, first, 0, 1)
                info["first_call_s"] = time.perf_counter() - t1
                greedy_generate(fn, first, 1, 2)
            _sync(device)
            info["ready_s"] = time.perf_counter() - t0
            if name == "compile":
                from fxopt.report.compiled import shutdown_compile_workers

                info.update(skips.as_dict(), dynamo=dynamo_stats())
                shutdown_compile_workers()  # idle workers would compete with the timing on a small host
            elif name in GRAPH_SYSTEMS:
                info["graphs"] = [{k: getattr(e, k) for k in ("status", "reason", "num_nodes", "replays",
                                                              "programmatic_edges", "note")}
                                  for e in fn.graph_entries]
            model.reset_cache()
            systems[name] = (fn, model)
        except Exception as e:  # noqa: BLE001 -- one system's failure is recorded; the others are measured
            info["error"] = _err(e)
    return systems


def _logits_along(fn, tokens: list[int], device: torch.device) -> torch.Tensor:
    """Teacher-forced: each step's logits (float32) with ``tokens`` as the inputs, from position 0."""
    ids = torch.tensor(tokens, device=device).view(-1, 1, 1)
    positions = torch.arange(len(tokens), device=device)
    with torch.no_grad():
        return torch.cat([fn(ids[t], positions[t:t + 1]).float().clone() for t in range(len(tokens))])


def _check(systems: dict, args, device: torch.device, row: _Row) -> None:
    from fxopt.models.decoder import greedy_generate

    row.stage("correctness")
    first = torch.tensor([[FIRST_TOKEN]], device=device)
    eager_fn, eager = systems["eager"]
    eager.reset_cache()
    reference = greedy_generate(eager_fn, first, 0, args.check_tokens)
    forced = [FIRST_TOKEN, *reference[:-1]]
    eager.reset_cache()
    want = _logits_along(eager_fn, forced, device)
    row["eager_tokens_head"] = reference[:16]
    check: dict[str, dict] = {}
    row["check"] = check
    for name, (fn, model) in systems.items():
        if name == "eager":
            continue
        try:
            model.reset_cache()
            tokens = greedy_generate(fn, first, 0, args.check_tokens)
            model.reset_cache()
            got = _logits_along(fn, forced, device)
            diff = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
            check[name] = {"tokens_identical": diff is None, "first_different_token": diff,
                           "max_abs_logits_diff": (got - want).abs().max().item(),
                           "logits_absmax": want.abs().max().item()}
        except Exception as e:  # noqa: BLE001
            check[name] = {"error": _err(e)}
        model.reset_cache()
    eager.reset_cache()


def _kernels(systems: dict, device: torch.device, row: _Row) -> None:
    from fxopt.launches import count_launches

    row.stage("kernels")
    inputs = (torch.tensor([[FIRST_TOKEN]], device=device), torch.tensor([0], device=device))
    kernels: dict[str, Any] = {}
    busy: dict[str, Any] = {}
    row["kernels_per_step"] = kernels
    row["busy_us_per_step"] = busy  # GPU busy time of one step (the profiler's kernels, summed)
    for name, (fn, model) in systems.items():
        try:
            # a TorchDispatchMode makes torch.compile'd code fall back to eager: count that one on the GPU only
            n = count_launches(fn, inputs, dispatched=name != "compile")
            kernels[name] = n.cuda_kernels if device.type == "cuda" else n.dispatched
            busy[name] = n.gpu_busy_us
        except Exception as e:  # noqa: BLE001
            kernels[name] = _err(e)
        model.reset_cache()
    row["kernels_unit"] = "GPU kernels (profiler)" if device.type == "cuda" else "dispatched ATen ops"


def _time(systems: dict, args, device: torch.device, row: _Row) -> None:
    """NOTE [Interleaved timing]: every system decodes once per round, in rotated order."""
    from fxopt.models.decoder import greedy_generate
    from fxopt.report.measure import rotated, spread

    row.stage("timing")
    first = torch.tensor([[FIRST_TOKEN]], device=device)
    names = list(systems)
    for name in names:  # warm-up
        fn, model = systems[name]
        for _ in range(2):
            model.reset_cache()
            greedy_generate(fn, first, 0, args.tokens)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(args.rounds):
            for name in rotated(names, r):
                fn, model = systems[name]
                samples = []
                for _ in range(args.reps):
                    model.reset_cache()  # a new prompt: position 0 (transformers' StaticCache counts its own)
                    _sync(device)
                    t0 = time.perf_counter()
                    greedy_generate(fn, first, 0, args.tokens)  # returns the tokens on the host: synchronized
                    samples.append(args.tokens / (time.perf_counter() - t0))
                per_round[name].append(statistics.median(samples))
    finally:
        gc.enable()
    timing: dict[str, dict] = {}
    for name in names:
        timing[name] = {"tokens_per_s": statistics.median(per_round[name]), "spread": spread(per_round[name]),
                        "round_tokens_per_s": per_round[name]}
        if name != "eager":
            ratios = [a / b for a, b in zip(per_round[name], per_round["eager"])]
            timing[name]["x_eager"] = spread(ratios)
    row["timing"] = timing
    row["timed"] = (f"{args.rounds} rounds x {args.reps} decodes of {args.tokens} tokens per system, rotated order; "
                    "tokens/s = median of the per-round medians")


def child_main(args) -> int:
    """``--child``: one config; its row as JSON on the last line of stdout (anything else printed goes to stderr)."""
    json_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    row = _Row(args.row_file, model=args.model, preset=args.preset, dtype=args.dtype, device=str(device))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true float32 (NOTE [TF32])
    try:
        systems = _build_systems(args, device, dtype, row)
        _check(systems, args, device, row)
        _kernels(systems, device, row)
        _time(systems, args, device, row)
        if "compile" in systems:  # recompiles during the checks or the timing would show here
            from fxopt.report.compiled import dynamo_stats

            row["setup"]["compile"]["dynamo_after_timing"] = dynamo_stats()
        row.stage("done")
    except Exception as e:  # noqa: BLE001 -- the row says how far it got
        row["error"] = _err(e)
    json_out.write(json.dumps(row, default=str) + "\n")
    json_out.flush()
    return 0


# -- the parent ----------------------------------------------------------------------------------------------------
def run_in_child(config: dict, args, log_path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        row_file = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--row-file", row_file, "--device", args.device,
               "--systems", ",".join(args.systems), "--tokens", str(args.tokens), "--rounds", str(args.rounds),
               "--reps", str(args.reps), "--check-tokens", str(args.check_tokens),
               "--model", config["model"], "--preset", config["preset"], "--dtype", config["dtype"],
               "--enable", args.enable, "--disable", args.disable]
        t0 = time.perf_counter()
        with open(log_path, "w") as log, tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=log, start_new_session=True)
            error = None
            try:
                rc = proc.wait(timeout=args.timeout_s)
                if rc != 0:
                    error = f"child exited with {rc}"
            except subprocess.TimeoutExpired:
                error = f"timeout after {args.timeout_s:.0f} s"
            finally:  # the child's session: the child if still running, and any compile worker it started
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.seek(0)
            lines = [line for line in out.read().splitlines() if line.strip()]
        row = None
        if error is None and lines:
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(lines[-1])
            error = None if row is not None else "the child's last stdout line is not JSON"
        elif error is None:
            error = "the child printed no row"
        if row is None:
            row = dict(config)
            with contextlib.suppress(OSError, json.JSONDecodeError), open(row_file) as f:
                row = json.load(f)  # what the child had measured
            row["error"] = f"{error} (stage: {row.get('stage', 'start')})"
    row["child_s"] = time.perf_counter() - t0
    return row


def _f(v: Any, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        config = f"{r['model']} {r['preset']} {r['dtype']}"
        if r.get("error"):
            lines.append([config] + [""] * 10 + [r["error"][:100]])
        timing, setup, check = r.get("timing", {}), r.get("setup", {}), r.get("check", {})
        for name in ALL_SYSTEMS:
            if name not in timing and name not in setup:
                continue
            t, s, c = timing.get(name, {}), setup.get(name, {}), check.get(name, {})
            tps = t.get("tokens_per_s")
            same = {True: "yes", False: f"no ({c.get('first_different_token')})"}.get(c.get("tokens_identical"), "")
            ready = s.get("ready_s")
            note = s.get("error") or s.get("skipped") or s.get("unoptimized_reason") or c.get("error") or ""
            if name == "compile" and s.get("cudagraph_skips"):
                note = f"{s['cudagraph_skips']} cudagraph skips {' '.join(s['cudagraph_skip_reasons'][:1])}"
            if name == "compile" and s.get("dynamo_after_timing", {}).get("graphs", 1) > 1:
                note = f"recompiled: {s['dynamo_after_timing']['graphs']} graphs; {note}"
            k, b = r.get("kernels_per_step", {}).get(name), r.get("busy_us_per_step", {}).get(name)
            # the time between kernels, per kernel: a token's time (its argmax and host sync included) less the
            # step's GPU busy time, over its kernels (issue 19: the gap between kernels; PDL's target)
            gap = (1e6 / tps - b) / k if tps and isinstance(k, int) and k and isinstance(b, (int, float)) else None
            lines.append([config, name, _f(tps), _f(1e6 / tps if tps else None), _f(t.get("x_eager", {}).get("median"),
                          ".2f"), k, _f(b), _f(gap, ".2f"), same,
                          _f(c.get("max_abs_logits_diff"), ".2e"), _f(ready, ".2f"), note[:100]])
    head = ["config", "system", "tokens/s", "µs/token", "x eager", "kernels/step", "busy µs/step", "gap µs/kernel",
            "tokens = eager's",
            "max |Δlogits|", "ready s", "note"]
    return tabulate(lines, head, tablefmt="github")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="plain,transformers")
    parser.add_argument("--presets", default="small,gpt2_small_size")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--disable", default="", help="default passes (optimize's disable=), comma-separated, that "
                        "the fxopt_graphs_disabled system runs without")
    parser.add_argument("--enable", default="", help="opt-in passes (optimize's enable=), comma-separated, e.g. "
                        "keep_faster_regions; for every fxopt system, or for fxopt_graphs_enabled alone where it is "
                        "among --systems")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per timed decode")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3, help="decodes per system per round")
    parser.add_argument("--check-tokens", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=180, help="a child running longer is killed")
    parser.add_argument("--budget-s", type=float, default=420, help="no child starts after this many seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "reports"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="small", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    picked = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in picked if s not in ALL_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {', '.join(ALL_SYSTEMS)}")
    args.systems = ["eager"] + [s for s in ALL_SYSTEMS if s in picked and s != "eager"]  # eager always, first
    if args.child:
        return child_main(args)

    from fxopt.report.compiled import finish_native_build
    from fxopt.report.measure import environment

    print(f"fxopt native call path: {finish_native_build(announce=print)}", flush=True)  # not in a child's timing
    configs = [{"model": m, "preset": p, "dtype": d} for m in args.models.split(",") for p in args.presets.split(",")
               for d in args.dtypes.split(",")]
    logs = os.path.join(args.out, "bench_decode_logs")
    os.makedirs(logs, exist_ok=True)
    start, rows, skipped = time.perf_counter(), [], []
    for i, config in enumerate(configs):
        if time.perf_counter() - start > args.budget_s:
            skipped = configs[i:]
            break
        name = f"{config['model']}_{config['preset']}_{config['dtype']}"
        print(f"[{time.perf_counter() - start:5.0f}s] {name}", flush=True)
        rows.append(run_in_child(config, args, os.path.join(logs, f"{name}.log")))
    result = {"environment": environment(torch.device(args.device)), "args": vars(args), "rows": rows,
              "skipped_for_time": skipped}
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = table(rows)
    env = result["environment"]
    with open(os.path.join(args.out, "bench_decode.md"), "w") as f:
        f.write(f"# Batch-1 decoding\n\n{env['date']} · {env['device_name']} · torch {env['torch']} · fxopt "
                f"{env.get('git_describe')} · {args.tokens} tokens per decode, {args.rounds} interleaved rounds x "
                f"{args.reps}; tokens = eager's over {args.check_tokens} greedy tokens; max |Δlogits| teacher-forced "
                f"on eager's tokens; kernels per decode step; ready = setup + 3 steps\n\n{text}\n")
        if skipped:
            f.write(f"\nNot run (time budget): {', '.join(str(c) for c in skipped)}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
