"""The pass pipeline: one ordered list, each step commented. See README.md beside this file for the invariants."""

from __future__ import annotations

from .base import Pass, PassLog, PassRecord, PassResult, note, record, run_passes, snapshot, stats, tag
from .cleanup import remove_dead_code, remove_dropout, remove_identity


def default_pipeline(backend: str = "auto") -> list[Pass]:
    """The passes :func:`fxopt.optimize` runs, in order. ``backend`` picks the fused-kernel code generator."""
    return [
        # Dropout in eval mode is the identity; removing it first lets later passes see conv -> bn -> relu chains.
        Pass("remove_dropout", remove_dropout, "Dropout in eval mode -> its input"),
        # nn.Identity, .contiguous() on contiguous tensors, .to() to the same dtype, x * 1, x + 0 ...
        Pass("remove_identity", remove_identity, "no-op nodes -> their input"),
        # What the passes above left unused.
        Pass("remove_dead_code", remove_dead_code, "unused nodes and submodules"),
    ]


def pass_names(backend: str = "auto") -> list[str]:
    return [p.name for p in default_pipeline(backend)]


__all__ = ["Pass", "PassLog", "PassRecord", "PassResult", "default_pipeline", "note", "pass_names", "record",
           "remove_dead_code", "remove_dropout", "remove_identity", "run_passes", "snapshot", "stats", "tag"]
