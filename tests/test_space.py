"""The Space export: a folder that can be pushed to a Hugging Face Space as it is, whose app starts
from that folder alone; the push goes through huggingface_hub (mocked here: nothing is uploaded)."""
import os
import subprocess
import sys

import pytest

from browser_support import app_server
from conftest import ROOT
from dtrak_core import cli, space


@pytest.fixture(scope="module")
def exported(tiny_root, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("space") / "dtrak-space")
    return dest, space.export(dest, ROOT, tiny_root)


def _git_binary(path: str) -> bool:
    """git's own rule (a NUL byte in the first 8,000 bytes), as an independent check of is_binary."""
    with open(path, "rb") as f:
        return b"\0" in f.read(8000)


def test_the_folder_holds_the_app_and_nothing_else(exported, tiny_root):
    dest, out = exported
    files = {os.path.relpath(p, dest) for p in space.walk_files(dest)}
    assert {"app.py", "README.md", "requirements.txt", ".gitattributes", "dtrak_core/__init__.py",
            "dtrak_core/space.py", "assets/manifest.json"} <= files
    assert not any(f.startswith(("tests/", "benchmarks/", ".venv/")) or "__pycache__" in f for f in files)
    for f in files:
        if f.startswith("dtrak_core/") or f == "app.py":
            assert open(os.path.join(dest, f), "rb").read() == open(os.path.join(ROOT, f), "rb").read(), f
    shipped = {os.path.relpath(p, tiny_root) for p in space.walk_files(tiny_root)}
    assert {f[len("assets/"):] for f in files if f.startswith("assets/")} == shipped
    assert out["files"] == len(files) and out["binary"] > 0
    assert not [n for n in os.listdir(os.path.dirname(dest)) if ".partial-" in n]  # staging renamed into place


def test_every_binary_file_is_routed_to_lfs(exported):
    dest, _ = exported
    patterns = [line.split()[0] for line in open(os.path.join(dest, ".gitattributes")) if "filter=lfs" in line]
    binary = [os.path.relpath(p, dest).replace(os.sep, "/") for p in space.walk_files(dest) if _git_binary(p)]
    assert binary and any(b.endswith(".npy") for b in binary)
    assert [b for b in binary if not any(space.routed(b, p) for p in patterns)] == []
    assert not any(space.routed("app.py", p) or space.routed("assets/manifest.json", p) for p in patterns)


def test_requirements_take_torch_from_the_cpu_index(exported):
    dest, _ = exported
    lines = open(os.path.join(dest, "requirements.txt")).read().splitlines()
    assert lines[0] == f"--extra-index-url {space.CPU_INDEX}"
    project = [l.split("#")[0].strip() for l in open(os.path.join(ROOT, "requirements.txt"))]
    torch_pin = next(p for p in project if p.startswith("torch=="))
    assert f"{torch_pin}+cpu" in lines
    assert {p for p in project if p and not p.startswith("torch==")} <= set(lines)
    with pytest.raises(ValueError, match="pins no torch"):
        space.space_requirements("numpy==2.0\n")
    with pytest.raises(ValueError, match="one version"):
        space.space_requirements("torch>=2\n")


def test_front_matter_is_checked():
    meta = space.read_front_matter(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())
    space.check_front_matter(meta)  # the project's own README is a valid Space config
    assert len(meta["short_description"]) <= space.MAX_SHORT_DESCRIPTION
    with pytest.raises(ValueError, match="short_description is 61 characters"):
        space.check_front_matter(dict(meta, short_description="x" * 61))
    with pytest.raises(ValueError, match="'app_file'"):
        space.check_front_matter(dict(meta, app_file="main.py"))
    with pytest.raises(ValueError, match="no front matter"):
        space.read_front_matter("# a README without a header\n")


def test_export_refuses_a_folder_in_use(tiny_root, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        space.export(str(tmp_path / "busy"), ROOT, tiny_root)
    with pytest.raises(ValueError, match="not a model folder"):
        space.export(str(tmp_path / "new"), ROOT, str(tmp_path))
    with pytest.raises(ValueError, match="run from the checkout"):
        space.export(str(tmp_path / "new"), str(tmp_path), tiny_root)
    assert os.listdir(tmp_path) == ["busy"]


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls, uploads nothing."""
    calls = []

    def __init__(self, token=None):
        FakeHub.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/spaces/{repo_id}"

    def upload_folder(self, **kw):
        FakeHub.calls.append(("upload_folder", kw))


def test_cli_exports_and_pushes_through_the_hub_client(tiny_root, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    dest = str(tmp_path / "out")
    rc = cli.main(["space", "export", dest, "--source", ROOT, "--assets", tiny_root, "--push", "someone/dtrak"])
    assert rc == 0, capsys.readouterr().err
    created = next(c for c in FakeHub.calls if c[0] == "create_repo")
    assert created[1] == "someone/dtrak" and created[2]["repo_type"] == "space" and created[2]["space_sdk"] == "gradio"
    upload = next(c for c in FakeHub.calls if c[0] == "upload_folder")[1]
    assert upload["folder_path"] == dest and upload["repo_id"] == "someone/dtrak" and upload["repo_type"] == "space"
    assert "pushed to https://huggingface.co/spaces/someone/dtrak" in capsys.readouterr().out
    assert cli.main(["space", "export", dest, "--source", ROOT, "--assets", tiny_root]) == 2  # not empty any more
    assert "not an empty folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="user/name"):
        space.push(dest, "not a repo id")


@pytest.mark.server
def test_the_exported_app_starts_from_its_folder_alone(exported, tmp_path):
    """`python app.py` in the exported folder, with nothing of this checkout on its path, serves
    the model it ships (the Hub runs the Space the same way)."""
    dest, _ = exported
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DTRAK_ASSETS")}
    elsewhere = subprocess.run([sys.executable, "-c", "import dtrak_core"], cwd=str(tmp_path), env=env,
                               capture_output=True)
    assert elsewhere.returncode != 0  # so the app below can only run on the folder's own copy
    with app_server(None, tmp_path, timeout=240, cwd=dest) as url:
        from gradio_client import Client

        out = Client(url, verbose=False).predict(3, 10, "square", 4, api_name="/attribute_seed")
        assert len(out["proponents"]) == 4 and out["n_train"] > 0
