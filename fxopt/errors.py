"""The exceptions fxopt raises on purpose. Each message says what went wrong, where, and how to fix it."""

from __future__ import annotations


class FxoptError(Exception):
    """Base class of every error fxopt raises deliberately."""


class CaptureError(FxoptError):
    """The model could not be captured into a torch.fx graph."""


class PassError(FxoptError):
    """A pass raised or broke numerics and `strict=True` was asked for."""


class CompileError(FxoptError):
    """Generated source failed to compile; the message holds the compiler log."""


class VerificationError(FxoptError):
    """An optimized graph's outputs do not match eager's."""


class InferenceOnlyError(FxoptError, RuntimeError):
    """A backward pass reached an output of fxopt's optimized module, whose kernels have no backward."""
