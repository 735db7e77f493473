"""Checksums of precomputed results, recorded by the writer of each result and verified by its readers.

One rule, by how a result is written:

- a JSON result written whole by one writer (tables.json, evidence.json, lds_results.json, a
  counterfactual summary.json) is sealed: it carries its own checksum in a field (`FIELD`) covering
  the rest of its content, and is NOT listed in its folder's sidecar (`write_sealed_json` writes it
  and drops any entry an older writer left there);
- a folder of files written one by one (counterfactual job files, a before/after gallery) carries a
  sidecar `checksums.json` with the sha256 of each file its writer wrote; so do legacy results,
  written before their writer sealed them, recorded with `python -m dtrak_core checksums FILE`.

    write_sealed_json(path, obj)                # a JSON result with its own checksum (out of the sidecar)
    record(folder, ["a.npz"])                   # folder/checksums.json gains a.npz's sha256 (merged, locked)
    verify(path, "counterfactual job", remedy)  # an IntegrityError naming `path` when it does not match
    obj = read_sealed_json(path, what, remedy)  # verified (its field, else its folder's sidecar); field removed

What a reader gets is what its writer wrote: a result edited by hand (a job file re-saved with
another l2, a number changed in gallery.json or tables.json), truncated or swapped is refused,
naming the file and the fix, never shown. `python -m dtrak_core checksums FOLDER` records the
checksums of results written by a dtrak that recorded none (each file is read whole first; a
sealed JSON is checked against its own field and left out of the sidecar).
"""
from __future__ import annotations

import hashlib
import json
import os

from dtrak_core.errors import IntegrityError
from dtrak_core.files import atomic_write_json, folder_lock, json_safe, load_result, read_json, sha256_file

SIDECAR = "checksums.json"
FIELD = "content_sha256"  # a sealed JSON result's own checksum: sha256 of the rest of its content
WHAT = "checksums of the results in this folder"


def json_digest(obj) -> str:
    """sha256 (64 hex digits) of `obj` as canonical JSON (sorted keys, no spaces, no NaN): the same
    for the same content however it is indented, and the same after a JSON round trip."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(obj: dict) -> dict:
    """`obj` (strict JSON content: see `files.json_safe`) with `FIELD`, the checksum of the rest of it."""
    rest = {k: v for k, v in obj.items() if k != FIELD}
    return {**rest, FIELD: json_digest(rest)}


def _sidecar_path(folder: str) -> str:
    return os.path.join(folder, SIDECAR)


def _sidecar_remedy(folder: str) -> str:
    return (f"restore it, or, if every result in {folder} is one its writer wrote, record their checksums again "
            f"with `python -m dtrak_core checksums {folder}`")


def read_sidecar(folder: str) -> dict[str, str] | None:
    """{file name: sha256} recorded in folder/checksums.json; None when there is none. A damaged
    sidecar is an `IntegrityError` naming it."""
    path = _sidecar_path(folder)
    if not os.path.isfile(path):
        return None
    found = read_json(path, WHAT, _sidecar_remedy(folder)).get("sha256")
    if not isinstance(found, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in found.items()):
        raise IntegrityError(path, f"({WHAT}) has no valid 'sha256' entry", _sidecar_remedy(folder))
    return found


def _write(folder: str, entries: dict[str, str]) -> None:
    atomic_write_json(_sidecar_path(folder), {
        "about": "sha256 of each result file in this folder, recorded by the code that wrote it; readers refuse a "
                 "file that does not match (dtrak_core/checksums.py)",
        "sha256": dict(sorted(entries.items()))})


def record(folder: str, names, *, replace: bool = False) -> dict[str, str]:
    """Record the sha256 of each file `names` (names inside `folder`) in folder/checksums.json,
    merged with what it holds (replace: the sidecar then lists exactly these files). The writer
    calls it right after writing the files. Returns the sidecar's entries."""
    names = [os.path.basename(n) for n in names]
    with folder_lock(folder):
        entries = {} if replace else dict(read_sidecar(folder) or {})
        for name in names:
            entries[name] = sha256_file(os.path.join(folder, name))
        _write(folder, entries)
    return entries


def forget(folder: str, names) -> None:
    """Drop the entries of `names` from folder/checksums.json (files a writer deleted)."""
    with folder_lock(folder):
        entries = read_sidecar(folder)
        if entries is None:
            return
        for name in names:
            entries.pop(os.path.basename(name), None)
        _write(folder, entries)


def write_sealed_json(path: str, obj: dict) -> dict:
    """Write the JSON result `obj` whole, sealed with its own checksum (`seal`), and drop `path`'s
    entry from its folder's sidecar if one lists it: a sealed file verifies by itself, and a stale
    entry would hide the sidecar's loss. Returns what was written."""
    sealed = seal(json_safe(obj))
    atomic_write_json(path, sealed)
    folder = os.path.dirname(path) or "."
    if os.path.basename(path) in (read_sidecar(folder) or {}):
        forget(folder, [path])
    return sealed


def verify(path: str, what: str, remedy: str, *, required: bool = True) -> None:
    """`path` is the file its writer recorded in its folder's checksums.json; else an
    `IntegrityError` naming it, saying what it is (`what`) and what to do (`remedy`).

    required=False: a folder with no checksums.json at all (results written before dtrak recorded
    checksums) is not checked; a file missing from an existing sidecar still is an error."""
    folder = os.path.dirname(path) or "."
    entries = read_sidecar(folder)
    if entries is None:
        if not required:
            return
        raise IntegrityError(path, f"({what}) has no recorded checksum ({_sidecar_path(folder)} is missing), so "
                             f"whether it is the file its writer wrote cannot be checked (results written before "
                             f"dtrak recorded checksums: if every file in {folder} is its writer's, record them with "
                             f"`python -m dtrak_core checksums {folder}`)", remedy)
    name = os.path.basename(path)
    if name not in entries:
        raise IntegrityError(path, f"({what}) has no checksum in {_sidecar_path(folder)} (it was added by hand, or "
                             f"by a writer that records none)", remedy)
    if not os.path.isfile(path):
        raise IntegrityError(path, f"({what}) is missing, though {_sidecar_path(folder)} lists it", remedy)
    have = sha256_file(path)
    if have != entries[name]:
        raise IntegrityError(path, f"({what}) hashes to {have[:16]}, not to its checksum {entries[name][:16]} in "
                             f"{_sidecar_path(folder)} (it was edited, re-saved, truncated or replaced after its "
                             f"writer wrote it)", remedy)


def read_sealed_json(path: str, what: str, remedy: str, *, required: bool = True) -> dict:
    """A JSON result, verified: by its own `FIELD` when it has one, else by its folder's
    checksums.json (`verify`); an `IntegrityError` naming the file otherwise. The content without
    `FIELD`. required=False: a file with neither (written before checksums were recorded) is
    returned unchecked, for a writer that merges it into a result it seals again."""
    obj = read_json(path, what, remedy)
    if FIELD in obj:
        rest = {k: v for k, v in obj.items() if k != FIELD}
        try:
            have = json_digest(rest)
        except ValueError:  # NaN or inf: not what a writer seals
            have = "not strict JSON"
        if have != obj[FIELD]:
            raise IntegrityError(path, f"({what}) does not match its own {FIELD} (a value in it was edited by hand, "
                                 f"or the file is damaged)", remedy)
        return rest
    verify(path, what, remedy, required=required)
    return obj


# -- recording the checksums of results written before checksums were recorded -------------------------
RESULT_SUFFIXES = (".npz", ".json", ".png")


def _readable(path: str) -> None:
    """`path` reads back whole (an .npz's zip CRCs, a JSON document, a PNG's chunks); else an IntegrityError."""
    if path.endswith(".npz"):
        load_result(path)
    elif path.endswith(".json"):
        read_json(path, "result", "restore it or delete it")
    elif path.endswith(".png"):
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.load()
        except Exception as e:  # PIL raises many types
            raise IntegrityError(path, f"(image) cannot be read ({type(e).__name__}: {e})", "restore it or delete it")


def _sealed(path: str) -> bool:
    """`path` is a JSON result with its own checksum, verified against it (an IntegrityError when it
    does not match): it belongs in no sidecar."""
    if not path.endswith(".json") or FIELD not in read_json(path, "result", "restore it or delete it"):
        return False
    read_sealed_json(path, "result", "restore it, or rewrite it with the command that wrote it")
    return True


def result_files(folder: str) -> list[str]:
    """The result files of a folder (.npz, .json, .png; not the sidecar), sorted."""
    return sorted(n for n in os.listdir(folder) if n.endswith(RESULT_SUFFIXES) and n != SIDECAR
                  and not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))


def record_folder(folder: str) -> dict[str, str]:
    """Read every result file of `folder` whole, then record all their checksums (replacing the
    sidecar): for results written by a dtrak that recorded none. Sealed JSONs are verified and left out."""
    names = result_files(folder)
    for name in names:
        _readable(os.path.join(folder, name))
    return record(folder, [n for n in names if not _sealed(os.path.join(folder, n))], replace=True)


def record_path(path: str) -> tuple[str, dict]:
    """`record_folder` for a folder, or one file read whole and added to its folder's sidecar
    (`python -m dtrak_core checksums PATH`; a sealed JSON is verified and its entry dropped
    instead): (the sidecar written, its entries)."""
    if os.path.isdir(path):
        return _sidecar_path(path), record_folder(path)
    if os.path.isfile(path):
        _readable(path)
        folder = os.path.dirname(path) or "."
        if _sealed(path):
            if os.path.basename(path) in (read_sidecar(folder) or {}):
                forget(folder, [path])
            return _sidecar_path(folder), read_sidecar(folder) or {}
        return _sidecar_path(folder), record(folder, [os.path.basename(path)])
    raise ValueError(f"{path!r} is neither a folder nor a file")
