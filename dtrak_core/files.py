"""Files on disk: atomic writes (a killed process leaves the old file or the new one, never a part)
and verified reads that name the file and the fix when it is damaged."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

from dtrak_core.errors import IntegrityError


def read_json(path: str, what: str, remedy: str) -> dict:
    """The JSON object in `path` (`what` it is, e.g. "model manifest"); an `IntegrityError` naming the
    file, what it is and `remedy` (what to do) when it is missing, unreadable or not a JSON object."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise IntegrityError(path, f"({what}) is missing", remedy) from None
    except OSError as e:
        raise IntegrityError(path, f"({what}) cannot be read ({e.strerror or e})", remedy) from None
    try:
        obj = json.loads(data)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        problem = "is empty" if not data.strip() else f"is not valid JSON ({e})"
        raise IntegrityError(path, f"({what}) {problem}: it is truncated or corrupt", remedy) from None
    if not isinstance(obj, dict):
        raise IntegrityError(path, f"({what}) is not a JSON object (got {type(obj).__name__})", remedy)
    return obj


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a file so that a killed process leaves either the old file or the new one, never a
    part (the temporary name ends in .tmp, which git ignores)."""
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes it owner-only; a plain open would not
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def json_safe(obj):
    """`obj` as strict JSON can hold it: nan and inf -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def save_result(path: str, **arrays) -> None:
    """Atomically write a .npz of the given arrays."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_result(path: str, keys=(), remedy: str | None = None) -> dict:
    """The arrays of a result written by `save_result` (each read whole, so the zip's CRCs are
    checked); an `IntegrityError` (a ValueError) naming the file when it is unreadable, damaged or
    lacks one of `keys` (results are written atomically, so a killed run never leaves a partial one),
    with `remedy` (what to do; default: rerun the command that wrote it)."""
    redo = "delete it and rerun the same command to recompute that job" if remedy is None else remedy
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise IntegrityError(path, "is missing", "rerun the command that writes it" if remedy is None else remedy) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise IntegrityError(path, f"is not a readable result file ({type(e).__name__}: {e}): it is truncated or "
                             f"corrupt", redo) from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise IntegrityError(path, f"(result file) lacks {', '.join(missing)}: it is corrupt, or not this harness's",
                             redo)
    return arrays


def json_hash(obj) -> str:
    """16 hex digits of sha256 over `obj` as canonical JSON (sorted keys, no spaces): the same for
    the same content however a file holding it is indented or ordered."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def folder_lock(folder: str):
    """An exclusive advisory lock on a folder while a file in it is read, changed and written (two
    processes editing one manifest or one checksums sidecar): neither loses the other's change."""
    try:
        import fcntl
    except ImportError:  # no flock here (Windows): each write stays atomic, concurrent edits are not merged
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
