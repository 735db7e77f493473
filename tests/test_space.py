"""The Space export: a folder that can be pushed to a Hugging Face Space as it is, whose app starts
from that folder alone; the push goes through huggingface_hub (mocked here: nothing is uploaded)."""
import os
import shutil
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
    assert not any(f.startswith(("tests/", "benchmarks/", "experiments/", ".venv/")) or "__pycache__" in f for f in files)
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


# -- an allow-list: what is planted beside the product is never published ---------------------------
SECRET = "hf_PLANTED_SECRET_never_published"
NEVER = (".env", "assets/.env", "dtrak_core/.env",  # hidden files (dtrak_core/.env tracked, below)
         "assets/.git/config", "dtrak_core/.git/config",  # .git-like folders
         ".venv/lib/site.py", "assets/.venv/bin/activate", "dtrak_core/.venv/lib/site.py",
         "assets/.cache/huggingface/token", "dtrak_core/.cache/huggingface/token",  # (the first tracked, below)
         "assets/runs/models/m000.npz", "dtrak_core/featurize.out",  # git-ignored outputs
         "assets/notes-untracked.txt", "dtrak_core/scratch_untracked.py")  # neither tracked nor ignored


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=120)


def _plant(root, rels):
    for rel in rels:
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(SECRET)


@pytest.fixture
def checkout(tiny_root, tmp_path):
    """A temporary checkout, a git repository: the app, its package and its model folder tracked,
    and beside them every kind of file the export must never publish (some of them tracked)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    for name in ("app.py", "README.md", "requirements.txt"):
        shutil.copy2(os.path.join(ROOT, name), repo / name)
    shutil.copytree(os.path.join(ROOT, "dtrak_core"), repo / "dtrak_core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_root, repo / "assets")
    (repo / ".gitignore").write_text("assets/runs/\ndtrak_core/*.out\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _plant(str(repo), NEVER)
    _git(repo, "add", "-f", "dtrak_core/.env", "assets/.cache/huggingface/token")  # tracked, and still hidden
    outside = tmp_path / "outside.txt"
    outside.write_text(SECRET)
    os.symlink(outside, repo / "assets" / "linked.txt")  # untracked links to a file outside
    os.symlink(outside, repo / "dtrak_core" / "linked.py")
    os.symlink(os.path.join(ROOT, ".git"), repo / "assets" / "linked-git")  # a whole linked .git
    return repo, tmp_path


def _exported_files(dest):
    return {os.path.relpath(p, dest).replace(os.sep, "/") for p in space.walk_files(dest)}


def test_export_from_a_git_checkout_ships_tracked_product_files_only(checkout):
    """The reported defect: `space export` copied hidden files (.env, .git, .venv, a Hugging Face
    token), followed symlinks and exported git-ignored run outputs, and `--push` uploaded them."""
    repo, tmp_path = checkout
    dest = str(tmp_path / "space")
    space.export(dest, str(repo))
    files = _exported_files(dest)
    assert not [f for f in files if f in NEVER or "linked" in f]
    assert [f for f in files if space._hidden(f)] == [".gitattributes"]  # the export's own, none copied
    assert not [f for f in files if SECRET in open(os.path.join(dest, f), errors="replace").read()]
    tracked = subprocess.run(["git", "-C", str(repo), "ls-files"], capture_output=True, text=True).stdout.split()
    product = {f for f in tracked if f.startswith(("dtrak_core/", "assets/")) and not space._hidden(f)
               and "__pycache__" not in f}
    assert files == product | {"app.py", "README.md", "FULL_README.md", "requirements.txt", ".gitattributes"}
    assert "assets/manifest.json" in files and "dtrak_core/space.py" in files


def test_export_refuses_a_tracked_symbolic_link_naming_it(checkout):
    repo, tmp_path = checkout
    _git(repo, "add", "assets/linked.txt")
    with pytest.raises(ValueError, match=f"^{repo / 'assets' / 'linked.txt'} is a symbolic link .*ships no links"):
        space.export(str(tmp_path / "space"), str(repo))
    assert not (tmp_path / "space").exists()


def test_export_of_a_model_folder_outside_git_skips_hidden_files_and_refuses_links(tiny_root, tmp_path, capsys):
    assets = tmp_path / "assets"
    shutil.copytree(tiny_root, assets)
    _plant(str(assets), (".env", ".git/config", ".venv/bin/activate", ".cache/huggingface/token",
                         "counterfactual/.token"))
    dest = tmp_path / "space"
    space.export(str(dest), ROOT, str(assets))
    shipped = {f[len("assets/"):] for f in _exported_files(dest) if f.startswith("assets/")}
    assert shipped == {os.path.relpath(p, tiny_root).replace(os.sep, "/") for p in space.walk_files(tiny_root)}
    os.symlink(os.path.join(ROOT, "README.md"), assets / "counterfactual" / "readme-link.md")
    code = cli.main(["space", "export", str(tmp_path / "again"), "--source", ROOT, "--assets", str(assets)])
    assert code == 2 and f"{assets / 'counterfactual' / 'readme-link.md'} is a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


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


def test_the_space_card_is_short_and_links_the_full_readme(exported):
    """A visitor's card (the project README's front matter, what it does, three steps, a screenshot
    when the checkout has one) with the project README shipped beside it."""
    dest, _ = exported
    card = open(os.path.join(dest, "README.md"), encoding="utf-8").read()
    space.check_front_matter(space.read_front_matter(card))  # still the Space's config
    assert len(card) < 3000 and "In three steps" in card and "(FULL_README.md)" in card
    full = open(os.path.join(dest, "FULL_README.md"), encoding="utf-8").read()
    assert full == space._body(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())
    has_shot = os.path.isfile(os.path.join(ROOT, space.SCREENSHOT))
    assert os.path.isfile(os.path.join(dest, "screenshot.png")) == has_shot and not os.path.exists(os.path.join(dest, "docs"))
