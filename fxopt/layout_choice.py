"""Channels-last or NCHW for a convolution network on CUDA, chosen by timing the optimized module both ways.

NOTE [Layout by measurement]: to_channels_last converts a convolution-heavy CUDA graph to channels-last because
cuDNN's tensor-core convolutions work in NHWC; but what else the network does decides whether that wins. On an H100
(torch 2.11, float16, batch 1; reports/2026-12-07-h100-s18-eb2cb76/call1/fp16_ablate.txt) fxopt without the pass
took timm EfficientNet-B0 from 468.6 to 414.1 µs of GPU time (its squeeze-excitation means read channels-last
rows H x W elements apart, its depthwise convolutions gain nothing from NHWC), and torchvision MobileNetV3-L from
302.4 to 348.8. No rule over the convolutions' shapes tells the two apart (Inductor weighs each convolution's FLOPs
by a per-kind factor, and would convert both), so where the pass applied, the rest of the pipeline is run a second
time without it, each result is checked against eager as always, both optimized modules are timed as a CUDA graph
replays them (NOTE [Choosing by measurement]: the GPU time of a call, what a caller with CUDA graphs waits for), and
the faster is kept unless the other wins by less than ``MARGIN``. The to_channels_last record of the kept module says
both times. It costs a second run of the passes after to_channels_last (and of those before it, which are cheap) for
the networks where the pass applies; a model that writes its own state (a cache) is not timed and keeps channels-last.
Opt-in (``optimize(..., choose_layout=True)``) until a GPU run shows what it picks and costs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .passes.base import PassRecord

PASS = "to_channels_last"
MARGIN = 1.03  # NCHW is kept only when it measures faster than channels-last by more than this factor
Built = tuple  # (optimized GraphModule, its pass records, its lowered runner)


def may_apply(backend: str, passes: Any, disabled: Sequence[str], writes_state: bool) -> bool:
    """Whether the layout may be chosen by measurement: the default pipeline on CUDA with to_channels_last in it,
    for a model that does not write its own state."""
    return (backend == "cuda" and passes is None and PASS not in disabled and not writes_state
            and torch.cuda.is_available())


def applied(records: Sequence[PassRecord]) -> bool:
    """Whether to_channels_last changed the graph (else there is no other layout to time)."""
    return any(r.name == PASS and r.status == "applied" for r in records)


def replay_us(fns: list[Callable[[], Any]]) -> list[float]:
    """µs a call of each of ``fns`` as a CUDA graph replays it (NOTE [Choosing by measurement])."""
    from .runtime.probe import graph_times_us

    return graph_times_us(fns, calls=5, reps=7)


def choose(channels_last: Built, build_nchw: Callable[[], Built], args: Sequence[Any]) -> Built:
    """The faster of ``channels_last`` and what ``build_nchw()`` builds (the same pipeline without
    to_channels_last), timed on ``args``; the kept module's to_channels_last record notes both times."""
    try:
        nchw = build_nchw()
        with torch.no_grad():
            cl_us, nchw_us = replay_us([lambda: channels_last[2].forward(*args), lambda: nchw[2].forward(*args)])
    except Exception as e:  # noqa: BLE001 -- not timed: channels-last, as the pipeline made it
        _record(channels_last[1]).notes.append(
            f"{PASS}: NCHW not timed ({type(e).__name__}: {str(e)[:200]}); channels-last kept")
        return channels_last
    times = f"channels-last {cl_us:.1f} µs a call against NCHW {nchw_us:.1f} (a CUDA graph's replay)"
    if nchw_us * MARGIN < cl_us:
        record = _record(nchw[1])
        record.status = "measured slower"
        record.notes.append(f"{PASS}: {times}: NCHW kept (NOTE [Layout by measurement])")
        return nchw
    _record(channels_last[1]).notes.append(f"{PASS}: {times}: channels-last kept (NOTE [Layout by measurement])")
    return channels_last


def _record(records: Sequence[PassRecord]) -> PassRecord:
    return next(r for r in records if r.name == PASS)
