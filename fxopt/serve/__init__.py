"""Serving: dynamic batching of single-sample requests (:class:`DynamicBatcher`) and a Ray Serve deployment of a
saved artifact (:mod:`fxopt.serve.ray_deployment`, needs ``pip install "fxopt[serve]"``; Ray is imported only when a
deployment is built, never by ``import fxopt``) with its HTTP client (:class:`HTTPClient`: request ids and bounded
retries of requests a failed replica lost, see NOTE [Replica failures and retries] there). ``import fxopt`` does not
import this package: the first ``fxopt.serve`` attribute access does (``fxopt/__init__.py``, PEP 562).

    batcher = fxopt.serve.DynamicBatcher(fxopt.optimize(model, inputs), max_batch_size=32, max_wait_ms=2)
    y = batcher(x)              # x: ONE sample, without the batch dim; from many threads at once
    y = await batcher.infer(x)  # asyncio
"""

from .batcher import BatcherClosed, BatcherError, DynamicBatcher, QueueFull, RequestTimeout, SampleSpec
from .ray_deployment import (FxoptServer, HTTPClient, ServeRequestError, ServeResponse, artifact_batch_sizes,
                             artifact_sample_spec, batcher_for_artifact, bucket_sizes, deployment,
                             optimize_for_batch_sizes, save_for_serving)

__all__ = [
    "BatcherClosed", "BatcherError", "DynamicBatcher", "FxoptServer", "HTTPClient", "QueueFull", "RequestTimeout",
    "SampleSpec", "ServeRequestError", "ServeResponse", "artifact_batch_sizes", "artifact_sample_spec",
    "batcher_for_artifact", "bucket_sizes", "deployment", "optimize_for_batch_sizes", "save_for_serving",
]
