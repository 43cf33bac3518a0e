"""What the report runs on: a zoo name, ``pkg.mod:callable`` or ``path/file.py:callable`` -> model and inputs."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import models


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


@dataclass
class Target:
    name: str
    model: torch.nn.Module
    inputs: tuple
    spec: str = ""  # what the user typed
    description: str = ""
    source: str = ""  # where the model came from, the same wherever the report runs: zoo:NAME, pkg.mod:fn, /abs/file.py:fn


def resolve_model(spec: str, device: torch.device, batch_size: int, shape: tuple[int, ...] | None) -> Target:
    """A zoo name, ``pkg.mod:callable`` or ``path/file.py:callable`` -> the model and its inputs on ``device``."""
    if spec in models.ZOO:
        entry = models.get(spec)
        model, inputs = entry.build(device=device, batch_size=batch_size)
        return Target(spec, model, inputs, spec, entry.description, f"zoo:{spec}")
    if ":" not in spec:
        raise UsageError(f"unknown model {spec!r}: not a zoo model (see --list) and not 'module:callable' or "
                         f"'file.py:callable'")
    where, attr = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"no such file: {where}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error it raises is a usage problem, shown in one line
            raise UsageError(f"importing {where} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"cannot import module {where!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UsageError(f"{where} has no callable {attr!r}")
    try:
        made = fn()
    except Exception as e:  # the user's factory
        raise UsageError(f"{spec}() raised {type(e).__name__}: {e}") from e
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    elif isinstance(made, torch.nn.Module):
        if shape is None:
            raise UsageError(f"{spec} returned a model without example inputs: pass --shape, e.g. --shape 1,3,224,224")
        model, inputs = made, (torch.randn(shape),)
    else:
        raise UsageError(f"{spec} returned {type(made).__name__}; expected an nn.Module or (module, inputs)")
    model = model.eval().to(device)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    doc = (getattr(fn, "__doc__", None) or "").strip().split("\n")[0] if not isinstance(fn, type) else ""
    if where.endswith(".py"):
        # the file's stem names it (model.py:make -> model.make): two files' `make` get two reports, not one
        return Target(f"{Path(where).stem}.{attr}", model, inputs, spec, doc, f"{Path(where).resolve()}:{attr}")
    return Target(spec, model, inputs, spec, doc, spec)


def describe_inputs(inputs: tuple) -> list[dict]:
    return [{"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""), "device": str(x.device)}
            if isinstance(x, torch.Tensor) else {"value": repr(x)} for x in inputs]
