"""fxopt/report/compiled.py: torch.compile's CUDA-graph skip reasons caught through this torch's own logging call,
background work finished before timing."""

import logging

import pytest

from fxopt.report import compiled


def test_cudagraph_skips_are_recorded_from_torchs_own_call():
    utils = pytest.importorskip("torch._inductor.cudagraph_utils")
    from torch._dynamo.utils import counters

    log_skip = getattr(utils, "log_cudagraph_skip_and_bump_counter", None)
    if log_skip is None:
        pytest.skip("this torch has no log_cudagraph_skip_and_bump_counter")
    loggers = compiled._skip_loggers()
    assert loggers, "no cudagraphs / perf_hints artifact logger found under torch._inductor"
    levels = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    with compiled.record_cudagraph_skips() as skips:
        log_skip("skipping cudagraphs due to mutated inputs (1 instances). Found from : \n  File x.py, line 3")
        counters["inductor"]["cudagraph_skips"] += 1  # how Inductor counts a skip on a graph without CUDA nodes
    got = skips.as_dict()
    assert got["cudagraph_skips"] == 2
    assert got["cudagraph_skip_reasons"] == ["skipping cudagraphs due to mutated inputs (1 instances). Found from :"]
    for lg, level, handlers in levels:  # left as found
        assert lg.level == level and lg.handlers == handlers


def test_messages_other_than_skips_are_not_recorded():
    pytest.importorskip("torch._inductor.cudagraph_utils")
    loggers = compiled._skip_loggers()
    with compiled.record_cudagraph_skips() as skips:
        for lg in loggers:
            lg.warning("recording cudagraph tree for (1,)")
            lg.log(logging.WARNING, "Skip comprehensive padding on CPU")
    assert skips.as_dict() == {"cudagraph_skips": 0, "cudagraph_skip_reasons": []}


def test_background_work_is_finished_and_reported(monkeypatch):
    from fxopt.runtime import native

    lines = []
    status = compiled.finish_native_build(announce=lines.append)
    assert status == native.status()
    assert status.startswith(("ready", "unavailable", "off")), status
    monkeypatch.setenv("FXOPT_NATIVE_CALL", "0")
    assert compiled.finish_native_build() == "off (FXOPT_NATIVE_CALL=0)"


def test_compile_workers_are_stopped_only_where_there_are_pools(monkeypatch):
    import sys
    import types

    stopped = []
    fake = types.SimpleNamespace(_pool_set=set(), shutdown_compile_workers=lambda: stopped.append(True))
    monkeypatch.setitem(sys.modules, "torch._inductor.async_compile", fake)
    assert compiled.shutdown_compile_workers() is False and not stopped
    fake._pool_set = {"a pool"}
    assert compiled.shutdown_compile_workers() is True and stopped == [True]
    monkeypatch.delitem(sys.modules, "torch._inductor.async_compile")
    assert compiled.shutdown_compile_workers() is False  # never imported: nothing started, nothing imported
    assert "torch._inductor.async_compile" not in sys.modules
