"""Serving a saved fxopt artifact with Ray Serve: one replica per GPU, a DynamicBatcher inside each.

Ray is optional and imported lazily (``pip install "ray[serve]"``): this module and ``fxopt.serve`` import without it.

1. Save an artifact holding one optimized graph per batch size a batch may be padded to (a ``LoadedModule`` runs
   only the signatures it was saved with)::

       model, inputs = fxopt.models.get("small_resnet").build(device="cuda")
       fxopt.serve.save_for_serving(model, inputs, "/models/resnet", max_batch_size=32)   # sizes 1, 2, 4, ..., 32

2. Serve it, one replica per GPU (each replica sees its GPU as cuda:0, where the artifact was saved)::

       from ray import serve
       from fxopt.serve.ray_deployment import FxoptDeployment
       app = FxoptDeployment.options(num_replicas=torch.cuda.device_count()).bind("/models/resnet", max_wait_ms=2)
       handle = serve.run(app)
       y = handle.remote(x).result()   # x: one sample, without the batch dim (a tensor, a list, torch.save bytes)

   Over HTTP: ``POST /`` with JSON ``{"input": [...]}`` answers ``{"output": [...]}``; a body of ``torch.save``
   bytes (any other content type) answers ``torch.save`` bytes.

Or run ``python -m fxopt.serve.ray_deployment --model small_resnet`` for the whole thing with a few requests.

``FxoptDeployment`` is ``deployment()`` with its defaults: ``num_gpus=1`` per replica when this process sees a GPU
(0 otherwise), and ``max_ongoing_requests=256`` (Ray's default of 5 in flight per replica would keep batches from
forming). ``deployment(**options)`` builds one with other Serve options.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .batcher import DynamicBatcher, SampleSpec

__all__ = ["FxoptServer", "artifact_batch_sizes", "artifact_sample_spec", "batcher_for_artifact", "bucket_sizes",
           "deployment", "optimize_for_batch_sizes", "save_for_serving"]


# -- artifacts for batching ----------------------------------------------------------------------------------------
def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch_size`` (included even when it is not a power of two)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def optimize_for_batch_sizes(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                             batch_sizes: Sequence[int], **optimize_options: Any):
    """``fxopt.optimize`` with one specialization per batch size (inputs of ``example_inputs``' shapes past dim 0)."""
    import fxopt

    sizes = sorted({int(b) for b in batch_sizes})
    optimize_options.setdefault("max_specializations", len(sizes))
    if optimize_options["max_specializations"] < len(sizes):
        raise ValueError(f"max_specializations {optimize_options['max_specializations']} < {len(sizes)} batch sizes")

    def batch(b: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(b)
        out = []
        for x in example_inputs:
            shape = (b, *x.shape[1:])
            if x.dtype.is_floating_point:
                out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=x.dtype, device=x.device))
            else:
                out.append(x[:1].expand(shape).contiguous())
        return tuple(out)

    opt = fxopt.optimize(model, batch(sizes[0]), **optimize_options)
    if opt.unoptimized_reason is not None:
        raise RuntimeError(f"the model cannot be optimized, so it cannot be saved: {opt.unoptimized_reason}")
    for b in sizes[1:]:
        opt.specialization_for(batch(b))
    return opt


def save_for_serving(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | Path,
                     max_batch_size: int = 32, batch_sizes: Sequence[int] | None = None,
                     **optimize_options: Any) -> Path:
    """Optimize ``model`` for each batch size in ``batch_sizes`` (default ``bucket_sizes(max_batch_size)``) and
    save the artifact to ``path``: what :class:`FxoptServer` / :func:`batcher_for_artifact` load."""
    import fxopt

    sizes = list(batch_sizes) if batch_sizes is not None else bucket_sizes(max_batch_size)
    return fxopt.save(optimize_for_batch_sizes(model, example_inputs, sizes, **optimize_options), path)


def _signatures(loaded) -> list[list[dict[str, Any]]]:
    return [s["signature"] for s in loaded.manifest["specializations"]]


def artifact_batch_sizes(loaded) -> list[int]:
    """The batch sizes a ``LoadedModule`` holds graphs for (dim 0 of its inputs), checking they differ only there."""
    sizes, rest = [], None
    for sig in _signatures(loaded):
        if not sig:
            raise ValueError("an artifact signature without tensor inputs cannot be batched")
        batch = {s["shape"][0] if s["shape"] else None for s in sig}
        if len(batch) != 1 or None in batch:
            raise ValueError(f"artifact signature {sig}: the inputs do not share a batch dim 0")
        per_sample = [(tuple(s["shape"][1:]), s["dtype"], s["device"]) for s in sig]
        if rest is not None and per_sample != rest:
            raise ValueError(f"the artifact's signatures differ past the batch dim: {rest} and {per_sample}; a "
                             "batcher serves one sample shape")
        rest = per_sample
        sizes.append(batch.pop())
    return sorted(set(sizes))


def artifact_sample_spec(loaded) -> tuple[SampleSpec, torch.device]:
    """The per-sample spec of a ``LoadedModule``'s inputs (any device: the batcher moves the batch) and its device."""
    from ..artifact import _dtype

    artifact_batch_sizes(loaded)  # checks the signatures agree
    sig = _signatures(loaded)[0]
    spec = SampleSpec((tuple(s["shape"][1:]), _dtype(s["dtype"]), None) for s in sig)
    return spec, torch.device(sig[0]["device"])


def batcher_for_artifact(artifact, max_batch_size: int | None = None, max_wait_ms: float = 2.0,
                         **batcher_options: Any) -> DynamicBatcher:
    """A DynamicBatcher around a saved artifact (a path or a ``LoadedModule``), padding to its saved batch sizes.

    Requests may come on any device (the batch is moved to the artifact's device); results come back on the CPU
    unless ``output_device`` says otherwise. ``max_batch_size`` defaults to the largest saved batch size.
    """
    import fxopt

    loaded = fxopt.load(artifact) if isinstance(artifact, (str, Path)) else artifact
    sizes = artifact_batch_sizes(loaded)
    spec, device = artifact_sample_spec(loaded)
    label = Path(artifact).name if isinstance(artifact, (str, Path)) else "artifact"
    options = dict(input_spec=spec, pad_to_buckets=sizes, device=device, output_device="cpu", copy_outputs=False,
                   name=f"fxopt-serve({label})")
    options.update(batcher_options)
    return DynamicBatcher(loaded, max_batch_size or sizes[-1], max_wait_ms, **options)


# -- the replica ---------------------------------------------------------------------------------------------------
class FxoptServer:
    """One replica: loads the artifact (on this replica's GPU), batches the requests it gets, returns results.

    A request is one sample without the batch dim, as a tensor, a (nested) list of numbers, ``torch.save`` bytes,
    ``{"input": ...}`` / ``{"inputs": [...]}`` for several model inputs, or a Starlette HTTP request holding one
    of these (JSON, or ``torch.save`` bytes). Usable without Ray as a plain object (``await server(x)``).
    """

    def __init__(self, artifact_path: str, max_batch_size: int | None = None, max_wait_ms: float = 2.0,
                 **batcher_options: Any):
        self.artifact_path = str(artifact_path)
        self.batcher = batcher_for_artifact(self.artifact_path, max_batch_size, max_wait_ms, **batcher_options)
        self._dtypes = [d for _, d, _ in self.batcher.input_spec]

    def _to_inputs(self, payload: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = torch.load(io.BytesIO(bytes(payload)), weights_only=True)
        if isinstance(payload, dict):
            if "inputs" in payload:
                payload = tuple(payload["inputs"])
            elif "input" in payload:
                payload = payload["input"]
            else:
                raise ValueError(f"a request dict needs 'input' or 'inputs', got keys {sorted(payload)}")
            if isinstance(payload, tuple):
                if len(payload) != len(self._dtypes):
                    raise ValueError(f"expected {len(self._dtypes)} input(s) per request, got {len(payload)}")
                return tuple(torch.as_tensor(p, dtype=d) for p, d in zip(payload, self._dtypes))
        if isinstance(payload, torch.Tensor):
            return (payload,)
        if isinstance(payload, tuple) and all(isinstance(p, torch.Tensor) for p in payload):
            return payload
        return (torch.as_tensor(payload, dtype=self._dtypes[0]),)

    async def infer(self, payload: Any) -> Any:
        """Decode one request and await its result from the batcher (tensors on the CPU)."""
        return await self.batcher.infer(*self._to_inputs(payload))

    async def __call__(self, request: Any) -> Any:
        if hasattr(request, "body") and hasattr(request, "headers"):  # a Starlette request: Serve's HTTP ingress
            from starlette.responses import JSONResponse, Response

            body = await request.body()
            if "json" in request.headers.get("content-type", ""):
                result = await self.infer(json.loads(body))
                return JSONResponse({"output": _tolist(result)})
            result = await self.infer(body)
            buf = io.BytesIO()
            torch.save(result, buf)
            return Response(buf.getvalue(), media_type="application/octet-stream")
        return await self.infer(request)

    def metrics(self) -> dict[str, Any]:
        """This replica's batcher metrics (queue depth, batch-size histogram, latency percentiles, ...)."""
        return self.batcher.metrics()

    def __del__(self) -> None:  # Serve calls this when it stops the replica: finish what was accepted
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()


def _tolist(result: Any) -> Any:
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.tolist() if isinstance(t, torch.Tensor) else t, result)


def deployment(num_gpus: float | None = None, **options: Any):
    """A Ray Serve deployment of :class:`FxoptServer` (``.bind(artifact_path, max_batch_size, max_wait_ms)``).

    ``num_gpus`` per replica: None for 1 when this process sees a GPU, else 0; one replica per GPU is
    ``.options(num_replicas=N_GPUS)``. Other keywords are ``serve.deployment`` options (``max_ongoing_requests``
    defaults to 256 so that a replica gets enough requests in flight to batch them).
    """
    from ray import serve

    if num_gpus is None:
        num_gpus = 1 if torch.cuda.is_available() else 0
    actor_options = dict(options.pop("ray_actor_options", None) or {})
    actor_options.setdefault("num_gpus", num_gpus)
    options.setdefault("name", "FxoptDeployment")
    options.setdefault("max_ongoing_requests", 256)
    return serve.deployment(FxoptServer, ray_actor_options=actor_options, **options)


_DEPLOYMENT = None


def __getattr__(name: str) -> Any:  # FxoptDeployment is built at first use, so that importing needs no Ray
    global _DEPLOYMENT
    if name == "FxoptDeployment":
        if _DEPLOYMENT is None:
            _DEPLOYMENT = deployment()
        return _DEPLOYMENT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- example -------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """Save a zoo model for serving, run it on Ray Serve (one replica per GPU), send requests, print metrics."""
    import argparse
    import asyncio
    import tempfile
    import time

    import fxopt

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="small_resnet", help="a zoo model name")
    ap.add_argument("--artifact", default=None, help="artifact directory (created when missing)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--local-testing", action="store_true", help="Serve's in-process local testing mode")
    args = ap.parse_args(argv)

    from ray import serve

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(args.artifact or Path(tempfile.gettempdir()) / f"fxopt-serve-{args.model}-{device}")
    entry = fxopt.models.get(args.model)
    if not (path / "manifest.json").is_file():
        model, inputs = entry.build(device=device)
        t0 = time.perf_counter()
        save_for_serving(model, inputs, path, max_batch_size=args.max_batch_size)
        print(f"saved {path} in {time.perf_counter() - t0:.1f} s")
    replicas = max(1, torch.cuda.device_count())
    app = deployment().options(num_replicas=replicas).bind(str(path), args.max_batch_size, args.max_wait_ms)
    handle = serve.run(app, _local_testing_mode=True) if args.local_testing else serve.run(app)
    xs = entry.inputs("cpu", args.requests)[0]

    async def go():
        return await asyncio.gather(*[handle.remote(x) for x in xs])

    t0 = time.perf_counter()
    ys = asyncio.run(go())
    dt = time.perf_counter() - t0
    print(f"{len(ys)} requests through {replicas} replica(s) in {dt:.2f} s ({len(ys) / dt:.0f} req/s); output "
          f"shape {tuple(ys[0].shape)}")
    print(json.dumps(handle.metrics.remote().result(), indent=1, default=str))
    if not args.local_testing:
        serve.shutdown()


if __name__ == "__main__":
    main()
