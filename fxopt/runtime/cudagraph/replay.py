"""The per-signature call closures of :class:`~.runner.CUDAGraphRunner` (a mixin: ``self`` is the runner).

Replay (the fast path)
    key -> precomputed closure: on a change of the caller's current stream, make the new stream wait for the old one
    (so successive calls on different streams never race on the static buffers); then, with ``graph_io`` (default, one
    graph per signature): the graph's own first nodes copy each dense input into its static buffer and, in copy mode,
    its last nodes copy each output into a fresh tensor; the call only points those copy nodes at this call's tensors
    (``cuGraphExecKernelNodeSetParams``, ~1 µs each; runtime/graph_io.py) and replays: one launch per call. Without
    it: ``static.copy_(x)`` per tensor input (skipped when ``x`` *is* the static buffer: see
    :meth:`CUDAGraphRunner.input_buffers`), ``graph.replay()``, outputs per ``output_mode``. Either way on the caller's
    current stream, no pytree work for a tensor or a tuple of tensors, no device objects; one uncontended lock
    (NOTE [Concurrent calls]). With ``native_replay`` (the default) the graph I/O call runs in C++ (NOTE [Native
    graph call]).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from .. import graph_io, nvtx
from ..kernel import is_dense
from .entries import Entry

_Tensor = torch.Tensor


def _is_plain(spec: Any, n: int) -> str | None:
    """'leaf' when the output is one leaf, 'tuple' when it is a plain tuple of leaves, else None."""
    probe = pytree.tree_unflatten(list(range(n)), spec)
    if n == 1 and probe == 0 and not isinstance(probe, (tuple, list, dict)):
        return "leaf"
    if type(probe) is tuple and probe == tuple(range(n)):
        return "tuple"
    return None



class ReplayClosures:
    """What a call of a signature runs: precomputed once per call signature (``_closure``), per output mode."""

    # -- per-signature closures ------------------------------------------------------------------------------------
    def _closure(self, entry: Entry, b: int | None, args: tuple = ()) -> Callable[[tuple], Any]:
        if entry.status != "captured":
            fn = self._fn

            def run_eager(args: tuple) -> Any:
                entry.eager_calls += 1
                return fn(*args)

            return run_eager
        # with FXOPT_NVTX=1 when set up: each replay inside a range named for its signature (NOTE [NVTX ranges])
        return nvtx.replay_range(self._replay_closure(entry, b, args), f"CUDA graph replay: {entry.description}")

    def _replay_closure(self, entry: Entry, b: int | None, args: tuple = ()) -> Callable[[tuple], Any]:
        if entry.io_inputs and args:
            return self._graph_io_closure(entry, b, args)
        entry.python_replay = entry.note or "copies outside the graph (rotate mode, or graph_io=False)"
        be, dev, runner = self._backend, entry.device, self
        partial = entry.bucket is not None and b is not None and b < entry.bucket
        ins = [(i, s.narrow(0, 0, b) if partial else s, s) for i, s in entry.static_inputs]
        stream_id, current_device = be.stream_id, be.current_device
        state = self._stream_state.setdefault(dev, [None])

        def switch(sid: int) -> None:
            old, state[0] = state[0], sid
            if old is not None:
                be.wait_for(dev, old)

        def replay_elsewhere(replay: Callable[[], None]) -> None:
            with be.device_guard(dev):
                replay()

        producers = [self._producer(entry, leaves, b if partial else None) for leaves in entry.out_leaves]
        replayers = entry.replayers
        k = len(replayers)

        if len(ins) == 1:
            (p0, d0, s0), = ins
            if k == 1:
                replay0, produce0 = replayers[0], producers[0]

                def run(args: tuple) -> Any:
                    sid = stream_id(dev)
                    if sid != state[0]:
                        switch(sid)
                    x = args[p0]
                    if x is not s0:
                        d0.copy_(x)
                    if current_device() != dev:
                        replay_elsewhere(replay0)
                    else:
                        replay0()
                    entry.replays += 1
                    if runner._last is not entry:
                        runner._touch(entry)
                    return produce0()

                return run

        def run_general(args: tuple) -> Any:
            sid = stream_id(dev)
            if sid != state[0]:
                switch(sid)
            for p, d, s in ins:
                x = args[p]
                if x is not s:
                    d.copy_(x)
            i = entry.cursor
            entry.cursor = i + 1 if i + 1 < k else 0
            if current_device() != dev:
                replay_elsewhere(replayers[i])
            else:
                replayers[i]()
            entry.replays += 1
            if runner._last is not entry:
                runner._touch(entry)
            return producers[i]()

        return run_general

    def _graph_io_closure(self, entry: Entry, b: int | None, args: tuple) -> Callable[[tuple], Any]:
        """The call for an entry whose graph copies its own inputs and outputs: point the copy nodes at this call's
        tensors, allocate the outputs, replay (NOTE in runtime/graph_io.py). Built per call signature: ``args``
        fixes every size below."""
        be, dev, runner = self._backend, entry.device, self
        partial = entry.bucket is not None and b is not None and b < entry.bucket
        statics = dict(entry.static_inputs)
        pointed, copied = [], []  # (position, node, bytes) pointed at the caller's tensor / copied in eagerly
        for p, node in entry.io_inputs:
            s = statics[p].narrow(0, 0, b) if partial else statics[p]
            x = args[p]
            if x.stride() == s.stride() and x.shape == s.shape and is_dense(x):
                pointed.append((p, node, x.numel() * x.element_size()))
            else:  # a layout the static buffer does not share: copied before the replay, the node copies nothing
                copied.append((p, node, s))
        copied += [(p, None, s.narrow(0, 0, b) if partial else s) for p, s in entry.static_inputs
                   if p not in {q for q, _ in entry.io_inputs}]
        leaves = entry.out_leaves[0]
        if partial:
            leaves = [t.narrow(0, 0, b) if batched else t for t, batched in zip(leaves, entry.batched)]
        outs = []
        if entry.io_outputs and all(is_dense(t) for t in leaves):
            outs = [(node, t.shape, t.stride(), t.dtype, t.numel() * t.element_size())
                    for node, t in zip(entry.io_outputs, leaves)]
        produce = None if outs else self._producer(entry, entry.out_leaves[0], b if partial else None)
        idle_outputs = [] if outs else entry.io_outputs  # outputs cloned after the replay: these copy nothing
        device = torch.device(be.device_type, dev)
        spec, shape = entry.spec, _is_plain(entry.spec, len(leaves))
        unflatten, empty_strided = pytree.tree_unflatten, torch.empty_strided
        stream_id, current_device = be.stream_id, be.current_device
        state = self._stream_state.setdefault(dev, [None])
        replay = entry.replayers[0]

        def run(args: tuple) -> Any:
            sid = stream_id(dev)
            if sid != state[0]:
                old, state[0] = state[0], sid
                if old is not None:
                    be.wait_for(dev, old)
            for p, node, nbytes in pointed:
                node.point(args[p].data_ptr(), node.dst, nbytes)
            for p, node, s in copied:
                if args[p] is not s:
                    s.copy_(args[p])
                if node is not None:
                    node.point(node.dst, node.dst, 0)
            for node in idle_outputs:
                node.point(node.src, node.src, 0)
            if outs:
                result = []
                for node, shp, st, dt, nbytes in outs:
                    o = empty_strided(shp, st, dtype=dt, device=device)
                    node.point(node.src, o.data_ptr(), nbytes)
                    result.append(o)
            if current_device() != dev:
                with be.device_guard(dev):
                    replay()
            else:
                replay()
            entry.replays += 1
            if runner._last is not entry:
                runner._touch(entry)
            if not outs:
                return produce()
            return result[0] if shape == "leaf" else tuple(result) if shape == "tuple" else unflatten(result, spec)

        if copied or idle_outputs:
            entry.python_replay = ("an input copied before the replay (a layout its static buffer does not share)"
                                   if copied else "outputs cloned after the replay (not dense)")
            return run
        return self._native_closure(entry, run, pointed, outs, shape, produce)

    def _native_closure(self, entry: Entry, run: Callable[[tuple], Any], pointed: list, outs: list,
                        shape: str | None, produce: Callable[[], Any] | None) -> Callable[[tuple], Any]:
        """NOTE [Native graph call]: ``run`` above, done in C++ (native_call.cpp's ``graph_call``): point the input
        copy nodes, allocate the outputs and point their copy nodes, cuGraphLaunch. It takes the calls whose every
        tensor input is pointed (none copied eagerly), whose outputs are copied out by the graph into a tensor or a
        plain tuple (or are the graph's own buffers, in unsafe mode), and whose graph draws no random numbers (torch's
        ``replay()`` advances the generator first). Until the extension is loaded, and for a call on another stream
        or device than the last (the stream hand-over), ``run`` serves the call; ``run`` is also what the C++ side
        falls back to on anything unexpected. Saves the Python-side allocation, the ctypes calls and torch's replay
        wrapper: measured in benchmarks/NOTES.md."""
        from .. import native

        fixed = getattr(produce, "result", None) if produce is not None else None
        if outs:
            kind = {"leaf": 0, "tuple": 1}.get(shape)
        else:
            kind = 2 if fixed is not None else None
        entry.python_replay = (
            "native_replay=False" if not self.native_replay else "FXOPT_NATIVE_CALL=0" if not native.enabled()
            else "the graph draws random numbers (torch's replay() advances the generator)" if entry.uses_rng
            else "outputs are not one tensor or a plain tuple of tensors" if kind is None else None)
        if entry.python_replay is not None:
            return run
        be, dev, runner = self._backend, entry.device, self
        api = graph_io._api()
        graph_exec = be.graph_exec(entry.graphs[0])
        inputs = [node.native_input(p, nbytes) for p, node, nbytes in pointed]
        outputs = [node.native_output(nbytes, shp, st, dt) for node, shp, st, dt, nbytes in outs]
        device = torch.device(be.device_type, dev)
        holder: list = [None]

        # The C++ object's references are invisible to the garbage collector, so it must not hold anything that
        # leads back to it (run -> entry/runner -> run_native -> holder -> it): a cycle through it would never be
        # collected, and a deleted runner would keep its graphs and pool. It gets ``run`` through a weak reference
        # (run_native holds ``run`` while it can be called) and holds the graph itself, whose execution it launches.
        run_ref = weakref.ref(run)

        def fallback(args: tuple) -> Any:
            live = run_ref()
            if live is None:
                raise RuntimeError("fxopt: a native graph call outlived its runner's signature (released or evicted)")
            return live(args)

        graph = entry.graphs[0]

        def attach(mod) -> None:
            call = mod.graph_call(entry.description[:200], fallback, device, torch.Tensor, torch.nn.Parameter,
                                  api.set_params_address, api.graph_launch_address, graph_exec, inputs, outputs,
                                  kind, fixed, graph)
            holder[0] = call
            entry.native_calls.append(weakref.ref(call))
        native.start()
        native.when_ready(attach)
        stream_id, current_device = be.stream_id, be.current_device
        state = self._stream_state.setdefault(dev, [None])

        def run_native(args: tuple) -> Any:
            call = holder[0]
            if call is None:
                return run(args)
            sid = stream_id(dev)
            if sid != state[0] or current_device() != dev:
                return run(args)  # the hand-over between streams, the device guard
            if runner._last is not entry:
                runner._touch(entry)
            return call(args, sid)

        run_native.native = holder  # for tests and benchmarks: holder[0] is the native call once attached
        return run_native

    def _producer(self, entry: Entry, leaves: list, b: int | None) -> Callable[[], Any]:
        """What a call returns after the replay, per output mode, with everything precomputed."""
        spec, n = entry.spec, len(leaves)
        if b is not None:
            leaves = [t.narrow(0, 0, b) if batched else t for t, batched in zip(leaves, entry.batched)]
        shape = _is_plain(spec, n)
        is_tensor = [isinstance(t, _Tensor) for t in leaves]
        if self.output_mode == "copy":
            clone = is_tensor
        elif self.output_mode == "rotate":
            clone = [t and a for t, a in zip(is_tensor, entry.alias_input)]
        else:
            clone = [False] * n
        if not any(clone) and shape is not None:
            result = leaves[0] if shape == "leaf" else tuple(leaves)
            fixed = lambda: result  # noqa: E731
            fixed.result = result  # the same object every call (the native graph call returns it too)
            return fixed
        if shape == "leaf":
            (o,) = leaves
            return o.clone
        if shape == "tuple" and all(clone):
            return lambda: tuple([o.clone() for o in leaves])
        pairs = list(zip(leaves, clone))
        unflatten = pytree.tree_unflatten
        return lambda: unflatten([o.clone() if c else o for o, c in pairs], spec)
