"""CUDA graphs around a module: capture per input signature, replay through static buffers, guards and fallbacks.

:class:`CUDAGraphRunner` wraps any callable on tensors (fxopt's rewritten GraphModule, or a plain module). The first
call with a new *signature* warms the callable up, captures it into a CUDA graph and replays it; later calls with that
signature copy their inputs into the graph's static input buffers and replay. Calls the graph cannot serve run the
callable eagerly, and :meth:`CUDAGraphRunner.entries` / :meth:`CUDAGraphRunner.report` say why.

Per input signature (signatures.py) a graph is captured on a side stream (runner.py, through the capture
boundary of backend.py) and replayed by a closure precomputed for the signature (replay.py); each module's
docstring has the details of its part. The entries of entries.py are what the report shows.

Output modes
    ``"copy"`` (default): every call returns fresh tensors (one allocation each, filled by a copy node inside the
    graph); the caller may keep them forever. It is also the cheaper safe mode: on the H200 (2026-12-01,
    bench_cudagraph_outputs.py) copy costs 2.5 µs of latency over "unsafe" at batch 1, rotating buffers 6.0-6.4 µs
    (the rotation's calls cannot use the native graph call). ``"rotate"``: ``rotate_depth`` (k) graphs are captured
    per signature, each with its own output buffers and pool, and the calls cycle through them; no copy, but an
    output stays valid only for the next k-1 calls *with the same signature* (the k-th overwrites it). Outputs that
    alias a static input are cloned in this mode. ``"unsafe"``: the graph's static outputs are returned, overwritten by
    the next call with the same signature; for callers that consume the output (or copy it) before calling again. Which
    of copy and rotate is cheaper is measured by ``benchmarks/bench_cudagraph_outputs.py``. Calls with different
    signatures never overwrite each other's outputs (NOTE [Pools and held outputs]).

Guards and fallbacks (the entry's ``reason``)
    CPU tensors, inputs on several devices, no tensor inputs, tensors nested in lists/dicts, unhashable arguments;
    outputs on the CPU; a failed warm-up; a failed capture (CPU synchronization such as ``.item()``/``.cpu()``/printing
    or Python control flow on tensor values, ops that cannot be captured); replay differing from eager; the capture
    budget ``max_captures`` spent. A failed capture is cleaned up (stream capture ended, allocator routing to the pool
    ended; on torch versions whose ``capture_end`` does not do that itself, later captures use a fresh pool), the
    context is checked with a synchronize, and that call and later calls with the signature run eagerly and correctly.
    At most ``max_graphs`` signatures hold graphs; a new one evicts the least recently used (after a device
    synchronize, its graphs and buffers are dropped and their memory returns to the pool for later captures; an
    evicted signature seen again is captured again). Inputs that require grad under grad mode run eagerly (the
    runner is inference-only; capture runs under ``no_grad``).

Batch buckets (``batch_buckets=[1, 2, 4, 8]`` or ``batch_buckets=8`` for the powers of two up to 8)
    Dim 0 of every tensor input is the batch. A batch of b rows runs the graph of the smallest bucket >= b: rows [0, b)
    of each static input are copied from the call's inputs; outputs whose dim 0 is the batch (found at capture by
    comparing with an eager call on fewer rows) are sliced back to b rows. The padding rows are never zeros or
    uninitialized memory: at capture they are the last row of the input repeated, afterwards they keep rows of earlier
    calls (rows the model has run on), so a partial batch costs no extra copy per call. This assumes the rows are
    independent (each output row depends only on its input row: true of inference models without cross-batch ops);
    with ``verify=True`` the capture checks it for the capturing call. Inputs that disagree on dim 0, a 0-dim input,
    an empty batch or a batch above the largest bucket use the exact signature instead.

Report
    :meth:`entries` returns one :class:`GraphEntry` per signature: captured or not, the reason, graph node count
    (``cuGraphGetNodes`` on ``CUDAGraph(keep_graph=True).raw_cuda_graph()``, runtime/driver.py; None where the
    torch version cannot expose the graph), ``pool_bytes`` (growth of the device's reserved memory
    during the signature's capture: the segments the shared pool gained for it; 0 when it fit in memory the pool
    already held), ``output_bytes`` (the live output buffers it holds), replays and eager calls.
    :meth:`pool_reserved_bytes` sums the segments owned by the runner's pool(s) (``torch.cuda.memory_snapshot``).

Limits
    One runner's calls must not run from several threads at once (the static buffers are shared; calls from one
    thread on several streams are fine). A ``pool=`` shared between runners is only safe when their calls are
    ordered (one stream, or the caller's events): the stream hand-over is per runner. A graph holds raw handles
    of the kernels it launched, so their modules must stay loaded while it lives (fxopt's kernel registry is
    process-wide and never unloads). Called inside the caller's own CUDA-graph capture, a new signature runs eagerly
    (its ops join the caller's graph) and nothing is cached. On torch versions whose failed ``capture_end`` skips the
    pool release (fixed upstream in 2026), the failed capture's pool keeps its segments until the process exits.

The capture machinery sits behind a small backend object (:class:`TorchCUDABackend`, backend.py); CPU tests
pass a fake one.
"""

from .backend import CaptureFailed, TorchCUDABackend, cuda_graphs_supported, describe_capture_error
from .entries import GraphEntry
from .runner import OUTPUT_MODES, CUDAGraphRunner
from .signatures import signature_key

# names tests import from here (NATIVE_REPLAY_DEFAULT is read by CUDAGraphRunner() from
# fxopt.runtime.cudagraph.runner: set it there)
from .entries import Entry as _Entry  # noqa: F401
from .runner import NATIVE_REPLAY_DEFAULT  # noqa: F401

__all__ = ["CUDAGraphRunner", "GraphEntry", "CaptureFailed", "TorchCUDABackend", "cuda_graphs_supported",
           "describe_capture_error", "signature_key", "OUTPUT_MODES"]
