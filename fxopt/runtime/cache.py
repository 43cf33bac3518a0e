"""On-disk cache of compiled kernels: where it lives, how entries are keyed, and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "atomic_write_bytes", "cache_dir", "cache_key", "read_cached"]


def cache_dir() -> Path:
    """Root of the kernel cache: `$FXOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/fxopt`, else `~/.cache/fxopt`.

    Read on every call (not frozen at import) so tests and users can redirect it at run time.
    """
    env = os.environ.get("FXOPT_CACHE_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fxopt"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_key(*parts: str | bytes) -> str:
    """Hex digest (32 chars of sha256) over `parts`; each part is length-prefixed so ("ab", "c") != ("a", "bc")."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temp file lives in the same directory so `os.replace` is an atomic rename: a concurrent reader
    (another process sharing the cache) sees either no file or the complete one, never a partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file 0600; a cache may be shared, so give it ordinary read permissions.
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        # After a successful replace the temp name no longer exists; otherwise clean up the partial file.
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, then `os.replace`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def read_cached(path: Path) -> bytes | None:
    """Contents of a cache entry, or None if it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
