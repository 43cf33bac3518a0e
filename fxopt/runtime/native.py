"""The compiled call path of generated kernels (``native_call.cpp``), built once per machine and torch version.

NOTE [Native call path]: a fused launch from Python costs a plan lookup, a Python-side allocation and a ctypes
driver call, about one eager op of host time in all (benchmarks/NOTES.md). The same steps in C++ (match the plan on
the tensors' sizes and strides, allocate with the caching allocator, call cuLaunchKernel or the C++ kernel) cost a
fraction of it. The Python path stays the reference: it makes every plan, checks every input it was not built for,
and raises every error; the native call only serves inputs that exactly match a plan the Python path made and hands
anything else back to it (``fallback``).

The extension needs torch's C++ headers, Python's and a C++ compiler; it takes 10-15 s to build, so it is built on
a background thread the first time a kernel's call path is made (``start``), and loaded from the disk cache after
that. Until it is ready, calls take the Python path; each kernel switches over when it is (``when_ready``).
``FXOPT_NATIVE_CALL=0`` turns it off.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from .cache import cache_dir, cache_key

log = logging.getLogger(__name__)

__all__ = ["NONE", "CUDA", "CPU_FLAT", "CPU_STRIDED", "CPU_ARGS", "address", "enabled", "module", "plan_args", "start",
           "status", "wait", "when_ready"]

# Plan kinds of native_call.cpp's add_plan.
NONE, CUDA, CPU_FLAT, CPU_STRIDED, CPU_ARGS = range(5)

_SOURCE = Path(__file__).with_name("native_call.cpp")
_MODULE_NAME = "fxopt_native"

_lock = threading.Lock()
_thread: threading.Thread | None = None
_module: ModuleType | None = None
_error: str | None = None
_ready = threading.Event()
_callbacks: list[Callable[[ModuleType], None]] = []
_build_seconds: float | None = None


def enabled() -> bool:
    """Whether the native call path may be used (``FXOPT_NATIVE_CALL`` is not ``0``)."""
    return os.environ.get("FXOPT_NATIVE_CALL", "1") != "0"


def module() -> ModuleType | None:
    """The loaded extension, or None (not built yet, disabled, or failed: see ``status``)."""
    return _module


def status() -> str:
    """One line for reports: ready (and how long the build or load took), building, off, or why it failed."""
    if not enabled():
        return "off (FXOPT_NATIVE_CALL=0)"
    if _module is not None:
        return f"ready ({_build_seconds:.1f} s to build or load)"
    if _error is not None:
        return f"unavailable: {_error}"
    return "building" if _thread is not None else "not started"


def start() -> None:
    """Build or load the extension on a background thread, once per process (no-op when disabled)."""
    global _thread
    if not enabled() or _thread is not None:
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_build_and_load, name="fxopt-native-build", daemon=True)
            _thread.start()


def wait(timeout: float | None = None) -> ModuleType | None:
    """Start the build if needed and wait for it (benchmarks and tests); the module, or None."""
    start()
    if enabled():
        _ready.wait(timeout)
    return _module


def when_ready(callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once the extension is loaded: now if it is, else from the build thread. Never
    called if the build fails or the path is disabled."""
    if not enabled():
        return
    with _lock:
        if _module is None:
            if _error is None:
                _callbacks.append(callback)
            return
    callback(_module)


def _build_and_load() -> None:
    global _module, _error, _build_seconds
    t0 = time.perf_counter()
    try:
        mod = _load(_build())
    except Exception as e:  # only costs speed: the Python path keeps working
        _error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        log.info("native call path unavailable (%s); kernels keep the Python call path", _error)
        with _lock:
            _callbacks.clear()
        _ready.set()
        return
    _build_seconds = time.perf_counter() - t0
    with _lock:
        _module = mod
        callbacks, _callbacks[:] = list(_callbacks), []
    _ready.set()
    for callback in callbacks:
        try:
            callback(mod)
        except Exception:  # one kernel failing to attach leaves it on the Python path
            log.exception("attaching the native call path failed")


def _command(src: Path, out: Path) -> list[str]:
    from .cc import compiler_info

    info = compiler_info()
    if info is None:
        raise RuntimeError("no C++ compiler")
    torch_dir = Path(torch.__file__).parent
    include = torch_dir / "include"
    python_include = sysconfig.get_paths()["include"]
    if not (Path(python_include) / "Python.h").exists():
        raise RuntimeError(f"Python.h not found in {python_include} (install the python3-dev package)")
    if not (include / "torch" / "csrc" / "autograd" / "python_variable.h").exists():
        raise RuntimeError(f"torch's C++ headers not found under {include}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    lib = torch_dir / "lib"
    return [*info.command, "-O2", "-fPIC", "-shared", "-std=c++20", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{python_include}",
            str(src), "-o", str(out), f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
            f"-Wl,-rpath,{lib}"]


def _build() -> Path:
    """The extension's path: from the disk cache, else compiled now."""
    from .cc import compiler_info

    source = _SOURCE.read_text()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    info = compiler_info()
    key = cache_key("fxopt-native-v1", source, torch.__version__, str(Path(torch.__file__).parent), sys.version,
                    info.version if info else "")
    out_dir = cache_dir() / "native" / key
    path = out_dir / f"{_MODULE_NAME}{suffix}"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    # The compiler writes a temporary file that the same shell command renames into place (atomic within the
    # directory): a short script that exits before the build ends leaves the build running, and the next process
    # finds the module in the cache instead of starting over.
    tmp = out_dir / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    cmd = _command(_SOURCE, tmp)
    script = f"{shlex.join(cmd)} && chmod 644 {shlex.quote(str(tmp))} && mv -f {shlex.quote(str(tmp))} " \
             f"{shlex.quote(str(path))}"
    proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling the native call path failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
                           f"{proc.stderr[-2000:]}")
    return path


def _load(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def plan_args(out_sizes, out_strides, kind: int, fn: int = 0, launch: int = 0, grid=(1, 1, 1), block=(1, 1, 1),
              shared_mem: int = 0, tail=(), sizes=(), strides=()) -> tuple:
    """What a kernel's plan tells the native call (``add_plan``'s arguments after the key): the outputs' sizes and
    strides, how to launch (``kind``: NONE when there are no elements), and the values after the pointers."""
    return (tuple(map(tuple, out_sizes)), tuple(map(tuple, out_strides)), kind, fn, launch, tuple(grid), tuple(block),
            shared_mem, tuple(tail), tuple(sizes), tuple(strides))


def address(fn) -> int:
    """The address of a ctypes function (a C++ kernel's entry point, what add_plan's ``fn`` takes)."""
    import ctypes

    return ctypes.cast(fn, ctypes.c_void_p).value
