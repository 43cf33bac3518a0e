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

3. Call it over HTTP with :class:`HTTPClient`, which retries what a replica failure loses::

       client = fxopt.serve.HTTPClient("http://127.0.0.1:8000/")
       y = client.infer(x)                               # one sample in, one result out (torch.save bytes on the wire)
       r = client.request(x, request_id="order-17")      # r.output, r.request_id, r.attempts, r.replica

NOTE [Replica failures and retries]: what Ray Serve (2.60) does when a replica dies, and what fxopt adds.

* Serve's controller health-checks every replica (``health_check_period_s``, 10 s by default) and starts a new one
  in place of a dead one. A router (in the HTTP proxy, or behind a ``DeploymentHandle``) that gets an
  ``ActorDiedError`` from a replica stops routing to it at once.
* Serve hands a request to a replica only once the replica accepts it, and routes again a request that a replica
  refused or that died before accepting it. A request the replica had ALREADY accepted when it died is lost: the
  HTTP proxy answers it with a 500, a handle raises ``ActorDiedError`` (a ``RayActorError``). Serve has no option to
  retry these; its fault-tolerance guide asks for end-to-end retries from the client.
* So fxopt retries at the client (:class:`HTTPClient`), the one place that sees every failure: a replica that died
  mid-request, a proxy that died, a dropped connection. Inference is idempotent (the same sample gives the same
  result, and running it has no side effects), so sending a request again is safe; running it twice costs time,
  never a wrong or a duplicate answer. Each request carries an id (header ``x-request-id``, which Serve takes as its
  request id and sends back); the client gives its caller exactly one result per id: the first 200 whose echoed id
  is the one sent. Retries are bounded (``max_attempts`` tries, exponential backoff with jitter, ``timeout_s`` per
  try), and only 429/500/502/503/504 and connection errors are retried.
* The replica sorts its own failures for the client: a request it cannot decode, or a sample of the wrong
  shape/dtype, answers 400 with the reason (a retry would fail the same way, so it is never retried); a full,
  closing or timed-out batcher answers 503 with ``retry-after`` (another try may land on a free replica). An error
  of the model itself comes out as Serve's 500, and is retried like a lost request: a model that always fails costs
  ``max_attempts`` tries before :class:`ServeRequestError` says why.
* Not chosen: a retrying ingress deployment in front of the model replicas, an extra hop whose own replicas lose
  their in-flight requests when they die (the client must retry anyway); Serve config, which has no such retry.
  ``DeploymentHandle`` callers get ``ActorDiedError`` for a lost request and may send it again the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import io
import json
import logging
import os
import pickle
import random
import re
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import FxoptError
from .batcher import BatcherError, DynamicBatcher, RequestTimeout, SampleSpec

log = logging.getLogger(__name__)

__all__ = ["FxoptServer", "HTTPClient", "ServeRequestError", "ServeResponse", "artifact_batch_sizes",
           "artifact_sample_spec", "batcher_for_artifact", "bucket_sizes", "deployment", "optimize_for_batch_sizes",
           "save_for_serving"]

REQUEST_ID_HEADER = "x-request-id"  # Serve's own: the proxy takes it as the request's id and echoes it back
REPLICA_HEADER = "x-fxopt-replica"  # which replica answered (set by FxoptServer on its HTTP answers)


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
    from ..artifact import dtype_named as _dtype

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
# What a request body that cannot be decoded raises: torch.load of bytes that are not torch.save output (EOFError,
# UnpicklingError, RuntimeError "not a ZIP archive"), torch.as_tensor of a list that is no tensor (ValueError,
# TypeError), JSON that is not JSON (ValueError).
_UNDECODABLE = (ValueError, TypeError, EOFError, RuntimeError, pickle.UnpicklingError)


class FxoptServer:
    """One replica: loads the artifact (on this replica's GPU), batches the requests it gets, returns results.

    A request is one sample without the batch dim, as a tensor, a (nested) list of numbers, ``torch.save`` bytes,
    ``{"input": ...}`` / ``{"inputs": [...]}`` for several model inputs, or a Starlette HTTP request holding one
    of these (JSON, or ``torch.save`` bytes). Usable without Ray as a plain object (``await server(x)``).

    Over HTTP the answer is 200 with the result, 400 for a request that cannot be decoded or has the wrong sample
    shape/dtype, 503 when the batcher is full or closing; every answer names the replica in ``x-fxopt-replica``.
    See NOTE [Replica failures and retries] for what the statuses mean to a client.
    """

    def __init__(self, artifact_path: str, max_batch_size: int | None = None, max_wait_ms: float = 2.0,
                 **batcher_options: Any):
        self.artifact_path = str(artifact_path)
        self.batcher = batcher_for_artifact(self.artifact_path, max_batch_size, max_wait_ms, **batcher_options)
        self._dtypes = [d for _, d, _ in self.batcher.input_spec]
        self.replica_id = _replica_id()

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
            return await self._answer_http(request)
        return await self.infer(request)

    async def _answer_http(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        headers = {REPLICA_HEADER: self.replica_id}
        body = await request.body()
        as_json = "json" in request.headers.get("content-type", "")
        try:
            inputs = self._to_inputs(json.loads(body) if as_json else body)
            why = self.batcher.input_spec.mismatch(inputs)
            if why is not None:
                raise ValueError(why)
        except _UNDECODABLE as e:  # the client's to fix; a retry would fail the same way
            what = "JSON" if as_json else "torch.save bytes"
            return JSONResponse({"error": f"bad request ({what}): {type(e).__name__}: {e}; expected one sample of "
                                          f"{self.batcher.input_spec.describe()} without the batch dim"},
                                status_code=400, headers=headers)
        try:
            result = await self.batcher.infer(*inputs)
        except (BatcherError, RequestTimeout) as e:  # full, closing or timed out: a later try may find room
            log.warning("%s: answering 503: %s", self.replica_id, e)
            return JSONResponse({"error": f"replica {self.replica_id} is busy or stopping: {e}"}, status_code=503,
                                headers={**headers, "retry-after": "1"})
        # An error of the model itself propagates: Serve answers 500 (NOTE [Replica failures and retries]).
        if as_json:
            return JSONResponse({"output": _tolist(result)}, headers=headers)
        buf = io.BytesIO()
        torch.save(result, buf)
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)

    def replica_info(self) -> dict[str, Any]:
        """Which replica this is: its Serve replica id (as in ``x-fxopt-replica``), process id and artifact."""
        return {"replica_id": self.replica_id, "pid": os.getpid(), "artifact": self.artifact_path}

    def metrics(self) -> dict[str, Any]:
        """This replica's batcher metrics (queue depth, batch-size histogram, latency percentiles, ...)."""
        return self.batcher.metrics()

    def __del__(self) -> None:  # Serve calls this when it stops the replica: finish what was accepted
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()


def _replica_id() -> str:
    """Serve's id of the replica this runs in, or ``local-<pid>`` outside Serve."""
    # NOTE: a Serve replica has imported ray.serve before it builds its deployment class; a plain FxoptServer (no
    # Ray, or Ray not in use) must not pay for importing it, so the module table is asked, not the import system.
    serve = sys.modules.get("ray.serve")
    if serve is not None:
        from ray.serve.exceptions import RayServeException

        try:
            return serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # ray.serve imported, but this object is not inside a replica
            pass
    return f"local-{os.getpid()}"


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
    actor_options = {**(options.pop("ray_actor_options", None) or {})}
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


# -- the client ----------------------------------------------------------------------------------------------------
class ServeRequestError(FxoptError):
    """A request to an fxopt deployment got no result: refused (4xx), or still failing after every retry."""

    def __init__(self, message: str, *, request_id: str, status: int | None, attempts: int):
        super().__init__(message)
        self.request_id, self.status, self.attempts = request_id, status, attempts


@dataclasses.dataclass(frozen=True)
class ServeResponse:
    """One request's answer: the model's output for it, and how it came (tries taken, replica that answered)."""

    request_id: str
    output: Any
    attempts: int
    replica: str | None


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class HTTPClient:
    """Sends samples to an fxopt Ray Serve deployment over HTTP; retries, boundedly, what a replica failure loses.

    ``infer(*sample)`` returns the model's output for one sample (one tensor per model input, without the batch
    dim); ``request(...)`` returns a :class:`ServeResponse` with the id, tries and answering replica as well. The
    body is ``torch.save`` bytes both ways, so results are bit-exact. Thread-safe: each try opens its own connection.

    Retries (NOTE [Replica failures and retries]): a try that ends in a connection error, a timeout (``timeout_s``),
    or status 429/500/502/503/504 is sent again, with the same request id, after ``backoff_s * 2**k`` seconds
    (halved to doubled at random, capped at ``max_backoff_s``; a ``retry-after`` header is honoured up to that cap),
    up to ``max_attempts`` tries in all. Any other status is final. A 200 whose echoed ``x-request-id`` is not the
    id sent is an error, never a result. Every call returns one result or raises :class:`ServeRequestError`.
    """

    RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

    def __init__(self, url: str, *, max_attempts: int = 4, timeout_s: float = 30.0, backoff_s: float = 0.05,
                 max_backoff_s: float = 1.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"HTTPClient needs an http:// or https:// URL with a host, got {url!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        if timeout_s <= 0 or backoff_s < 0 or max_backoff_s < backoff_s:
            raise ValueError(f"need timeout_s > 0 and 0 <= backoff_s <= max_backoff_s, got timeout_s={timeout_s}, "
                             f"backoff_s={backoff_s}, max_backoff_s={max_backoff_s}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.max_attempts, self.timeout_s = max_attempts, timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def infer(self, *inputs: torch.Tensor, request_id: str | None = None) -> Any:
        """The deployment's output for one sample (see the class docstring for retries and errors)."""
        return self.request(*inputs, request_id=request_id).output

    def request(self, *inputs: torch.Tensor, request_id: str | None = None) -> ServeResponse:
        """Send one sample under ``request_id`` (default: a fresh uuid) and return its one answer."""
        rid = uuid.uuid4().hex if request_id is None else request_id
        if not isinstance(rid, str) or not _REQUEST_ID.fullmatch(rid):
            raise ValueError(f"request_id must be 1-128 characters of A-Z a-z 0-9 . _ : -, got {request_id!r}")
        if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
            raise TypeError(f"a request is one tensor per model input, got {[type(x).__name__ for x in inputs]}")
        buf = io.BytesIO()
        torch.save(inputs[0] if len(inputs) == 1 else tuple(inputs), buf)
        body = buf.getvalue()
        self._count("requests")
        last = "no try made"
        status: int | None = None
        for attempt in range(1, self.max_attempts + 1):
            self._count("attempts")
            retry_after = None
            try:
                status, headers, data = self._post(body, rid)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short: send again
                status, last = None, f"{type(e).__name__}: {e}"
            else:
                if status == 200:
                    echoed = headers.get(REQUEST_ID_HEADER)
                    if echoed is not None and echoed != rid:
                        self._count("failed")
                        raise ServeRequestError(f"{self.url}: request {rid} was answered for request {echoed}; "
                                                "something between this client and Serve mixes up answers",
                                                request_id=rid, status=status, attempts=attempt)
                    output = torch.load(io.BytesIO(data), weights_only=True)
                    return ServeResponse(rid, output, attempt, headers.get(REPLICA_HEADER))
                last = f"HTTP {status}: {_error_text(data)}"
                if status not in self.RETRY_STATUSES:
                    self._count("failed")
                    raise ServeRequestError(f"{self.url}: request {rid} refused with {last}", request_id=rid,
                                            status=status, attempts=attempt)
                retry_after = headers.get("retry-after")
            if attempt == self.max_attempts:
                break
            self._count("retries")
            log.info("%s: request %s try %d/%d failed (%s); sending it again", self.url, rid, attempt,
                     self.max_attempts, last)
            time.sleep(self._backoff(attempt, retry_after))
        self._count("failed")
        raise ServeRequestError(f"{self.url}: request {rid} got no answer in {self.max_attempts} tries; the last "
                                f"failed with {last}. Check that the deployment is running (serve.status()) and "
                                "raise max_attempts or timeout_s if it is only slow", request_id=rid, status=status,
                                attempts=self.max_attempts)

    def stats(self) -> dict[str, int]:
        """Counts so far: ``requests`` (calls), ``attempts`` (tries sent), ``retries``, ``failed`` (calls raised)."""
        with self._lock:
            return {k: self._counts[k] for k in ("requests", "attempts", "retries", "failed")}

    def _post(self, body: bytes, rid: str) -> tuple[int, dict[str, str], bytes]:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request("POST", self._path, body=body, headers={"content-type": "application/octet-stream",
                                                                 REQUEST_ID_HEADER: rid})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 2.0)
        if retry_after is not None and retry_after.strip().isdigit():
            delay = max(delay, float(retry_after))
        return min(delay, self.max_backoff_s)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1


def _error_text(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):  # not fxopt's JSON error body: Serve's own text, or a proxy's page
        return text[:500]


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
