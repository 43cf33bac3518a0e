"""Greedy decoding, batch 1, with a static KV cache: eager, torch.compile(mode="reduce-overhead", fullgraph=True) and
fxopt (+ CUDA graphs on a GPU), each on its own copy of the model (same weights), with tokens/s and whether each
system decodes the tokens eager decodes.

    python examples/decode.py [--model plain|transformers] [--preset small|gpt2_small_size]
                              [--dtype float32|bfloat16] [--tokens 64] [--device cuda|cpu] [--no-compile]

``plain`` is fxopt.models.decoder.Decoder (a Llama-style decoder holding its KV cache as buffers); ``transformers`` is
LlamaForCausalLM with a StaticCache allocated up front. The decode step is ``step(ids [1, 1], pos [1]) -> logits``;
fxopt optimizes it once for those shapes and, with ``cuda_graphs=True``, replays one CUDA graph per token.
bfloat16 tokens may part from eager's after a while: fused kernels round differently (the numbers are in
benchmarks/bench_decode.py's report).
"""

from __future__ import annotations

import argparse
import time

import torch

import fxopt
from fxopt.models.decoder import build_step, greedy_generate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["plain", "transformers"], default="plain")
    parser.add_argument("--preset", choices=["small", "gpt2_small_size"], default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (its first call is slow)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    first = torch.tensor([[3]], device=device)
    pos = torch.tensor([0], device=device)

    def step():  # every system gets its own model and cache, with the same weights (same seed)
        return build_step(args.model, args.preset, dtype, device)

    eager = step()
    systems = {"eager": (eager, eager)}  # name -> (what to call, the model whose cache it writes)
    setup = {}
    if not args.no_compile:
        t0 = time.perf_counter()
        try:
            model = step()
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
            greedy_generate(compiled, first, 0, 3)  # compiles, then records its CUDA graph (on a GPU)
            systems["torch.compile"] = (compiled, model)
            setup["torch.compile"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 -- an example: say why and go on without it
            print(f"torch.compile skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    variants = {"fxopt": False, "fxopt + CUDA graphs": True} if device.type == "cuda" else {"fxopt": False}
    for name, graphs in variants.items():
        t0 = time.perf_counter()
        model = step()
        opt = fxopt.optimize(model, (first, pos), cuda_graphs=graphs)
        greedy_generate(opt, first, 0, 3)
        setup[name] = time.perf_counter() - t0
        if opt.unoptimized_reason is not None:
            print(f"{name} runs the model unoptimized: {opt.unoptimized_reason}")
        systems[name] = (opt, model)  # opt writes the model's own cache

    reference = None
    print(f"{args.model} {args.preset} {args.dtype} on {device}, {args.tokens} tokens, batch 1")
    print(f"{'system':<22}{'tokens/s':>10}{'ms/token':>10}{'setup s':>9}  tokens as eager's")
    for name, (fn, model) in systems.items():
        for _ in range(2):  # warm-up: caches, allocator, graphs
            model.reset_cache()
            greedy_generate(fn, first, 0, min(8, args.tokens))
        model.reset_cache()  # a new prompt: the position restarts at 0 (transformers' StaticCache counts its own)
        sync(device)
        t0 = time.perf_counter()
        tokens = greedy_generate(fn, first, 0, args.tokens)  # ends with the tokens on the host: synchronized
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = tokens
        same = "yes" if tokens == reference else f"no, from token {_first_difference(tokens, reference)}"
        print(f"{name:<22}{args.tokens / seconds:>10.1f}{1e3 * seconds / args.tokens:>10.3f}"
              f"{setup.get(name, 0.0):>9.2f}  {same}")
    print(f"eager's tokens: {reference[:16]}{' ...' if len(reference) > 16 else ''}")


def _first_difference(a: list[int], b: list[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


if __name__ == "__main__":
    main()
