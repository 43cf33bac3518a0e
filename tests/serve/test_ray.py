"""Serving a saved artifact: the batcher padding to the saved batch sizes, the replica class without Ray, the HTTP
client's retries against a stub server, and the Ray Serve deployment: in Serve's in-process local testing mode, and
on a real local Ray cluster (started here, 127.0.0.1 only) with two replicas behind Serve's HTTP proxy, one of them
killed under load.

Ray tests need ``ray[serve]`` (``pip install -e ".[serve]"``). Without it they skip, except in CI (``CI=true``), where
a missing Ray is a broken install and fails them; ``FXOPT_ALLOW_NO_RAY=1`` lets them skip there too.
"""

from __future__ import annotations

import asyncio
import collections
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import fxopt
from fxopt.serve import (FxoptServer, HTTPClient, ServeRequestError, artifact_batch_sizes, artifact_sample_spec,
                         batcher_for_artifact, bucket_sizes, save_for_serving)

MODEL = "simple_cnn"  # quick to optimize for several batch sizes on CPU

# Ray Serve's config models use a pydantic idiom pydantic 2 deprecates: not fxopt's to fix, and noise in the log.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field` is deprecated")


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
    code = ("import sys, fxopt, fxopt.serve, fxopt.serve.ray_deployment; fxopt.serve.HTTPClient('http://127.0.0.1:1/');"
            " assert 'ray' not in sys.modules, 'importing fxopt imported ray'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_artifact_holds_one_graph_per_bucket(artifact):
    path, xs, ys = artifact
    loaded = fxopt.load(path)
    assert artifact_batch_sizes(loaded) == [1, 2, 4]
    spec, device = artifact_sample_spec(loaded)
    assert spec.describe() == "float32[3, 32, 32]" and device == torch.device("cpu")
    # simple_cnn's graphs keep dim 0 dynamic (fxopt/artifact.py, NOTE [Dynamic batch]): a batch of 3, for which no
    # graph was saved, runs too, so padding to the saved sizes is a choice of program, not a necessity.
    torch.testing.assert_close(loaded(xs[:3]), ys[:3], rtol=1e-4, atol=1e-5)


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


# -- the HTTP client against a stub server (no Ray) ----------------------------------------------------------------
class _StubServe(http.server.BaseHTTPRequestHandler):
    """Answers POSTs as scripted in ``server.script`` (status per try, for each request id); 200 returns 2 * x."""

    def do_POST(self):  # http.server's name for it
        rid = self.headers.get("x-request-id")
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.seen.append(rid)
        tries = self.server.seen.count(rid)
        script = self.server.script.get(rid, [])
        status = script[tries - 1] if tries <= len(script) else 200
        if status == "drop":  # the connection dies without an answer, as when the process behind it is killed
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if status == 200:
            buf = io.BytesIO()
            torch.save(torch.load(io.BytesIO(body), weights_only=True) * 2, buf)
            data, echo = buf.getvalue(), self.server.echo.get(rid, rid)
        else:
            data, echo = json.dumps({"error": f"scripted {status}"}).encode(), rid
        self.send_response(status)
        self.send_header("x-request-id", echo)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture()
def stub_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubServe)
    server.seen, server.script, server.echo = [], {}, {}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_http_client_retries_lost_requests_under_the_same_id(stub_server):
    url = f"http://127.0.0.1:{stub_server.server_address[1]}/"
    client = HTTPClient(url, max_attempts=3, timeout_s=10, backoff_s=0.01, max_backoff_s=0.05)
    x = torch.arange(6, dtype=torch.float32)
    stub_server.script.update({"a": [500, 503], "b": ["drop"], "c": [400], "d": [500, 500, 500], "e": [404]})
    stub_server.echo["f"] = "someone-else"

    r = client.request(x, request_id="a")  # two lost tries, then the answer
    assert (r.request_id, r.attempts) == ("a", 3) and torch.equal(r.output, x * 2)
    r = client.request(x, request_id="b")  # connection cut without an answer: sent again
    assert r.attempts == 2 and torch.equal(r.output, x * 2)
    with pytest.raises(ServeRequestError, match="refused with HTTP 400: scripted 400") as e:
        client.infer(x, request_id="c")  # the client's fault: never retried
    assert (e.value.status, e.value.attempts) == (400, 1)
    with pytest.raises(ServeRequestError, match="no answer in 3 tries; the last failed with HTTP 500") as e:
        client.infer(x, request_id="d")  # bounded: gives up after max_attempts
    assert e.value.attempts == 3
    with pytest.raises(ServeRequestError, match="404"):
        client.infer(x, request_id="e")
    with pytest.raises(ServeRequestError, match="answered for request someone-else"):
        client.infer(x, request_id="f")  # never hands out another request's answer
    with pytest.raises(ValueError, match="request_id must be"):
        client.infer(x, request_id="no spaces")
    assert collections.Counter(stub_server.seen) == {"a": 3, "b": 2, "c": 1, "d": 3, "e": 1, "f": 1}
    assert client.stats() == {"requests": 6, "attempts": 11, "retries": 5, "failed": 4}
    with pytest.raises(ValueError, match="http:// or https:// URL"):
        HTTPClient("127.0.0.1:8000")


# -- Ray Serve (needs ray[serve]) ----------------------------------------------------------------------------------
def _ray_serve():
    """(ray, ray.serve), or a skip where Ray may be missing; in CI a missing Ray is a broken install: a failure."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        in_ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
        if in_ci and os.environ.get("FXOPT_ALLOW_NO_RAY") != "1":
            pytest.fail(f"CI=true but ray[serve] does not import ({e}): the CI install must include fxopt's serve "
                        "extra (pip install -e \".[test,cuda,serve]\"); FXOPT_ALLOW_NO_RAY=1 skips these tests "
                        "instead", pytrace=False)
        pytest.skip(f"ray[serve] is not installed ({e}): pip install -e \".[serve]\"")
    return ray, serve


def test_missing_ray_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    monkeypatch.delenv("FXOPT_ALLOW_NO_RAY", raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI install must include fxopt's serve extra"):
        _ray_serve()
    monkeypatch.setenv("FXOPT_ALLOW_NO_RAY", "1")
    with pytest.raises(pytest.skip.Exception, match="ray.serve. is not installed"):
        _ray_serve()
    monkeypatch.delenv("FXOPT_ALLOW_NO_RAY")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="ray.serve. is not installed"):
        _ray_serve()


def test_ray_serve_local_testing_mode(artifact):
    _, serve = _ray_serve()
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


# NOTE [Load of the cluster tests]: the kill test must kill a replica that holds requests, or it tests nothing. Its
# CLIENTS (12) keep about 6 requests on each of the 2 replicas (Serve routes to the less loaded one), and a replica
# runs a batch only when 4 are queued or the oldest waited MAX_WAIT_MS: after each batch about 2 stay queued for the
# next, so a replica under this load is never empty. MAX_WAIT_MS is long so that slow clients on a busy machine
# (returning late) do not let a partial batch run and empty the queue.
MAX_WAIT_MS = 250.0
CLIENTS = 12
REPLICAS = 2


@pytest.fixture(scope="module")
def serve_app(artifact, tmp_path_factory):
    """A local Ray cluster (2 logical CPUs, 127.0.0.1, no dashboard, no usage stats) with Serve's HTTP proxy on a free
    port and the artifact deployed on REPLICAS replicas. Torn down at the end of the module, also on failure."""
    ray, serve = _ray_serve()
    from fxopt.serve.ray_deployment import deployment

    path, _, _ = artifact
    port = _free_port()
    env = {"OMP_NUM_THREADS": "1",  # two replicas and the client share 2 cores
           "FXOPT_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "fxopt-cache")}  # conftest's per-session cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise report usage over the network
        mp.delenv("RAY_ADDRESS", raising=False)
        t0 = time.perf_counter()
        try:
            ray.init(address="local", num_cpus=REPLICAS, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app = deployment(num_gpus=0).options(num_replicas=REPLICAS).bind(str(path), 4, MAX_WAIT_MS)
            handle = serve.run(app, name="fxopt", route_prefix="/")
            yield handle, f"http://127.0.0.1:{port}/", time.perf_counter() - t0
        finally:
            try:
                if ray.is_initialized():
                    serve.shutdown()
            finally:
                ray.shutdown()


def _replicas(handle, want: int, budget_s: float = 30.0) -> dict[str, int]:
    """{replica id: pid} of ``want`` replicas, asked through the handle (which spreads calls over the replicas)."""
    found: dict[str, int] = {}
    deadline = time.monotonic() + budget_s
    while len(found) < want and time.monotonic() < deadline:
        for info in [r.result(timeout_s=30) for r in [handle.replica_info.remote() for _ in range(8)]]:
            found[info["replica_id"]] = info["pid"]
    assert len(found) >= want, f"found {len(found)} of {want} replicas in {budget_s} s: {found}"
    return found


def test_ray_serve_two_replicas_over_http(serve_app, artifact, record_property):
    handle, url, startup_s = serve_app
    record_property("fxopt_ray", f"local Ray cluster + Serve + {REPLICAS} replicas up in {startup_s:.1f} s")
    _, xs, ys = artifact
    assert len(_replicas(handle, REPLICAS)) == REPLICAS

    client = HTTPClient(url, max_attempts=2, timeout_s=30)
    results = [None] * len(xs)

    def send(i):  # one thread per sample, all at once: both replicas get some
        results[i] = client.request(xs[i], request_id=f"http-{i}")

    # Serve's router picks a replica by its queue: on a loaded two-core machine one burst can all go to one replica
    # (CI, 2026-12-07), so bursts repeat, each checked in full, until both replicas have answered.
    seen: list[str] = []
    for _ in range(10):
        results = [None] * len(xs)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r is not None for r in results), "a request thread did not finish in 60 s"
        torch.testing.assert_close(torch.stack([r.output for r in results]), ys, rtol=1e-4, atol=1e-5)
        assert [r.request_id for r in results] == [f"http-{i}" for i in range(len(xs))]
        seen += [r.replica for r in results]
        if len(set(seen)) == REPLICAS:
            break
    assert len(set(seen)) == REPLICAS, seen

    # JSON in, JSON out; Serve echoes the request id, the replica names itself.
    req = urllib.request.Request(url, data=json.dumps({"input": xs[0].tolist()}).encode(),
                                 headers={"content-type": "application/json", "x-request-id": "json-0"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        got = torch.tensor(json.loads(resp.read())["output"])
        assert resp.headers["x-request-id"] == "json-0" and resp.headers["x-fxopt-replica"]
    torch.testing.assert_close(got, ys[0], rtol=1e-4, atol=1e-5)

    # A sample of the wrong shape is the client's fault: 400 naming the expected shape, and no retry.
    req = urllib.request.Request(url, data=json.dumps({"input": [1.0, 2.0]}).encode(),
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "float32[3, 32, 32]" in e.value.read().decode()
    with pytest.raises(ServeRequestError, match=r"HTTP 400.*expected a sample of shape \[3, 32, 32\]") as e:
        client.infer(torch.randn(3, 16, 16))
    assert e.value.attempts == 1

    torch.testing.assert_close(handle.remote(xs[1]).result(timeout_s=60), ys[1], rtol=1e-4, atol=1e-5)
    assert client.stats()["retries"] == 0


def test_ray_serve_replica_killed_under_load_loses_no_request(serve_app, artifact, record_property):
    """SIGKILL one replica's process (frozen with SIGSTOP until it holds a request) while CLIENTS threads send
    requests over HTTP without pause: every request sent gets exactly one answer, the right one for its sample, some
    of them after a retry; Serve then replaces the replica."""
    _, serve = _ray_serve()
    handle, url, _ = serve_app
    _, xs, ys = artifact
    replicas = _replicas(handle, REPLICAS)
    victim_id, victim_pid = min(replicas.items())

    client = HTTPClient(url, max_attempts=4, timeout_s=20, backoff_s=0.05, max_backoff_s=0.5)
    sent: list[str] = []  # ids, in the order the clients sent them
    answers: list[tuple[str, int, object]] = []  # (id echoed back, sample index, ServeResponse)
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()
    max_per_client, deadline = 400, time.monotonic() + 60  # bounds, whatever happens
    waiting_since: dict[int, float] = {}  # client -> when its request now outstanding was sent

    def client_loop(c: int) -> None:
        for k in range(max_per_client):
            if stop.is_set() or time.monotonic() > deadline:
                return
            rid, i = f"c{c}-{k}", (c + k * CLIENTS) % len(xs)
            with lock:
                sent.append(rid)
                waiting_since[c] = time.monotonic()
            try:
                r = client.request(xs[i], request_id=rid)
            except ServeRequestError as e:
                with lock:
                    errors.append(e)
                return
            finally:
                with lock:
                    waiting_since.pop(c, None)
            with lock:
                answers.append((r.request_id, i, r))

    def held(for_s: float) -> int:
        """Requests outstanding for more than ``for_s``: with the other replica answering in milliseconds, those
        are held by the frozen one."""
        now = time.monotonic()
        with lock:
            return sum(now - t > for_s for t in waiting_since.values())

    def answered() -> int:
        with lock:
            return len(answers)

    threads = [threading.Thread(target=client_loop, args=(c,), name=f"client-{c}") for c in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: answered() >= 3 * CLIENTS, 30, "the load to warm up")
        # Frozen first, so that the kill finds requests in the replica (killed at once, it sometimes held none and
        # the test tested nothing: 2026-12-07); then a crash (as the OOM killer would do it), not a graceful stop.
        os.kill(victim_pid, signal.SIGSTOP)
        try:
            _wait_for(lambda: held(0.5) >= 1, 15, "a request held by the frozen replica")
        finally:
            held_at_kill = held(0.5)
            with lock:
                before, in_flight = len(answers), len(sent) - len(answers)
                os.kill(victim_pid, signal.SIGKILL)
        t_kill = time.monotonic()
        _wait_for(lambda: answered() >= before + 5 * CLIENTS, 40, "answers after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    t_load = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a client thread is still running after 60 s"
    assert not errors, f"{len(errors)} request(s) got no answer: {errors[:3]}"

    stats = client.stats()
    retried = [r for _, _, r in answers if r.attempts > 1]
    record_property("fxopt_ray", f"{CLIENTS} clients sent {len(sent)} requests ({len(set(sent))} ids) in "
                    f"{t_load:.1f} s, {len(answers)} answered; SIGKILL of replica {victim_id} (pid {victim_pid}) "
                    f"{t_kill - t0:.1f} s in, after {before} answers with {in_flight} in flight, {held_at_kill} of "
                    f"them held by the frozen replica; {stats['retries']} client retries for {len(retried)} requests; "
                    f"{stats['failed']} failed")
    counts = collections.Counter(rid for rid, _, _ in answers)
    assert sorted(counts) == sorted(sent), "the answered ids are not the ids sent"
    assert set(counts.values()) == {1}, f"answered more than once: {[k for k, n in counts.items() if n > 1]}"
    for rid, i, r in answers:
        torch.testing.assert_close(r.output, ys[i], rtol=1e-4, atol=1e-5, msg=lambda m, rid=rid: f"{rid}: {m}")
    # The kill hit requests held by the replica (else this test tested nothing), and they were answered right,
    # above: sent again by the client after an error, or by Serve itself, which re-routes a request its dead replica
    # had not started (Ray 2.60, 2026-12-08: runs here with 0 client retries and runs with 3 to 7).
    assert held_at_kill >= 1 and stats["retries"] >= len(retried), (held_at_kill, stats)
    assert stats["requests"] == len(sent) and stats["failed"] == 0

    # Serve notices the dead replica and starts another in its place; both serve again.
    def replaced() -> bool:
        app = serve.status().applications["fxopt"].deployments["FxoptDeployment"]
        return app.replica_states.get("RUNNING", 0) == REPLICAS
    _wait_for(replaced, 90, f"Serve to replace replica {victim_id}")
    # asked through a new handle: the old one's router learns of the new replica when Serve pushes it, which took
    # more than 60 s on a loaded CI machine (2026-12-07)
    now = _replicas(serve.get_app_handle("fxopt"), REPLICAS, budget_s=90)
    assert victim_id not in now and victim_pid not in now.values(), now
    torch.testing.assert_close(client.infer(xs[0]), ys[0], rtol=1e-4, atol=1e-5)
    record_property("fxopt_ray", f"replaced by {sorted(set(now) - set(replicas))} "
                                 f"{time.monotonic() - t_kill:.1f} s after the kill")


def _wait_for(cond, budget_s: float, what: str) -> None:
    deadline = time.monotonic() + budget_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {budget_s} s for {what}")
        time.sleep(0.05)
