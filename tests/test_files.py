"""Atomic writes and verified reads (dtrak_core.files)."""
import json
import os
import stat

import pytest

from dtrak_core.errors import IntegrityError
from dtrak_core.files import atomic_write_bytes, atomic_write_json, read_json


def test_atomic_write_has_the_mode_a_plain_write_would(tmp_path):
    atomic_write_json(str(tmp_path / "a.json"), {"x": 1})
    with open(tmp_path / "b.json", "w") as f:
        f.write("{}")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json")  # readable by whoever serves the files
    assert read_json(str(tmp_path / "a.json"), "test file", "rewrite it") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.json")
    atomic_write_json(path, {"old": True})

    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b'{"new": true}')
    assert json.load(open(path)) == {"old": True} and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("content, problem", [(b"", "is empty"), (b"{ not json", "is not valid JSON"),
                                              (b"[1, 2]", "is not a JSON object"), (b"\xff\xfe", "is not valid JSON")])
def test_read_json_names_the_file_and_the_fix(tmp_path, content, problem):
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    with pytest.raises(IntegrityError, match=problem) as e:
        read_json(str(path), "model manifest", "rebuild it")
    assert str(path) in str(e.value) and "rebuild it" in str(e.value) and e.value.path == str(path)
    with pytest.raises(IntegrityError, match="is missing"):
        read_json(str(tmp_path / "absent.json"), "model manifest", "rebuild it")
