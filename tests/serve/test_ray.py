"""Serving a saved artifact: the batcher padding to the saved batch sizes, the replica class without Ray, and the Ray
Serve deployment (marked slow and skipped without ``ray[serve]``): in Serve's in-process local testing mode, and on
a local Ray cluster with HTTP.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch

import fxopt
from fxopt.serve import (FxoptServer, artifact_batch_sizes, artifact_sample_spec, batcher_for_artifact,
                         bucket_sizes, save_for_serving)

MODEL = "simple_cnn"  # quick to optimize for several batch sizes on CPU


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, inputs = fxopt.models.get(MODEL).build()
    path = save_for_serving(model, inputs, tmp_path_factory.mktemp("serve") / MODEL, max_batch_size=4)
    xs = fxopt.models.get(MODEL).inputs("cpu", 12, seed=3)[0]
    with torch.no_grad():
        ys = model(xs)
    return path, xs, ys


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_import_needs_no_ray():
    code = "import sys, fxopt.serve, fxopt.serve.ray_deployment; assert 'ray' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_artifact_holds_one_graph_per_bucket(artifact):
    path, _, _ = artifact
    loaded = fxopt.load(path)
    assert artifact_batch_sizes(loaded) == [1, 2, 4]
    spec, device = artifact_sample_spec(loaded)
    assert spec.describe() == "float32[3, 32, 32]" and device == torch.device("cpu")
    with pytest.raises(ValueError, match="Optimize the model again"):
        loaded(torch.randn(3, 3, 32, 32))  # why the batcher must pad: batch 3 has no graph


def test_batcher_for_artifact_pads_to_saved_sizes(artifact):
    path, xs, ys = artifact
    results = [None] * len(xs)
    barrier = threading.Barrier(len(xs))

    with batcher_for_artifact(path, max_wait_ms=5) as b:
        assert b.pad_to_buckets == [1, 2, 4] and b.max_batch_size == 4

        def client(i):
            barrier.wait()
            results[i] = b(xs[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with pytest.raises(ValueError, match=r"expected a sample of shape \[3, 32, 32\]"):
            b.submit(torch.randn(3, 16, 16))
        m = b.metrics()
    torch.testing.assert_close(torch.stack(results), ys, rtol=1e-4, atol=1e-5)
    assert m["completed"] == len(xs) and max(m["batch_size_histogram"]) <= 4


def test_server_without_ray_decodes_requests(artifact):
    path, xs, ys = artifact
    server = FxoptServer(str(path), max_batch_size=4, max_wait_ms=1)
    buf = io.BytesIO()
    torch.save(xs[2], buf)

    async def main():
        return await asyncio.gather(server(xs[0]), server(xs[1].tolist()), server(buf.getvalue()),
                                    server({"input": xs[3].tolist()}), server({"inputs": [xs[4]]}))

    try:
        outs = asyncio.run(main())
        with pytest.raises(ValueError, match="'input' or 'inputs'"):
            asyncio.run(server({"x": 1}))
        assert server.metrics()["completed"] == 5
    finally:
        server.batcher.close()
    torch.testing.assert_close(torch.stack(outs), ys[:5], rtol=1e-4, atol=1e-5)
    assert all(o.device.type == "cpu" for o in outs)


# -- Ray Serve (slow; needs ray[serve]) ---------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_serve_local_testing_mode(artifact):
    serve = pytest.importorskip("ray.serve")
    from fxopt.serve.ray_deployment import deployment

    path, xs, ys = artifact
    handle = serve.run(deployment(num_gpus=0).bind(str(path), 4, 20.0), _local_testing_mode=True)

    async def main():
        return await asyncio.gather(*[handle.remote(x) for x in xs])

    outs = asyncio.run(main())
    torch.testing.assert_close(torch.stack(outs), ys, rtol=1e-4, atol=1e-5)
    m = handle.metrics.remote().result()
    assert m["completed"] == len(xs) and max(m["batch_size_histogram"]) > 1  # gathered requests were batched
    torch.testing.assert_close(handle.remote(xs[0].tolist()).result(), ys[0], rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_serve_on_a_local_cluster_over_http(artifact):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from fxopt.serve.ray_deployment import deployment

    path, xs, ys = artifact
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(deployment(num_gpus=0).options(num_replicas=1).bind(str(path), 4, 2.0))
        outs = [r.result() for r in [handle.remote(x) for x in xs]]
        torch.testing.assert_close(torch.stack(outs), ys, rtol=1e-4, atol=1e-5)

        req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps({"input": xs[0].tolist()}).encode(),
                                     headers={"content-type": "application/json"})
        got = torch.tensor(json.loads(urllib.request.urlopen(req, timeout=60).read())["output"])
        torch.testing.assert_close(got, ys[0], rtol=1e-4, atol=1e-5)

        buf = io.BytesIO()
        torch.save(xs[1], buf)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=buf.getvalue(),
                                     headers={"content-type": "application/octet-stream"})
        got = torch.load(io.BytesIO(urllib.request.urlopen(req, timeout=60).read()), weights_only=True)
        torch.testing.assert_close(got, ys[1], rtol=1e-4, atol=1e-5)
        assert handle.metrics.remote().result()["completed"] == len(xs) + 2
    finally:
        serve.shutdown()
        ray.shutdown()
