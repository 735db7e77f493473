"""The app as a Hugging Face Space: one folder that can be pushed as it is, and the push.

    python -m dtrak_core space export DIR                   # write the folder
    python -m dtrak_core space export DIR --push USER/NAME  # ... and upload it (huggingface_hub)

Run it from the checkout (the folder with app.py; `--source` points elsewhere). The folder holds
what `python app.py` needs and nothing else, an allow-list of product files:

- where the checkout (or the model folder) is a git work tree, only the files git tracks there
  (`git ls-files`): never an untracked or git-ignored file (a run's outputs, a cache, a token);
- elsewhere (a model folder outside any repository), the files found in it;
- in both cases never a hidden file or folder (a path component starting with '.': .env, .git,
  .venv, .cache/huggingface/token), and never a symbolic link: a link among the files to ship is
  refused, naming it (a link could publish whatever it points to);

- README.md: a short card for visitors (`dtrak_core/ui/texts/space_card.md`, with docs/screenshot.png
  as screenshot.png) under the project README's front matter, which configures the Space (checked:
  sdk gradio, app_file app.py, sdk_version the installed gradio, short_description at most 60
  characters); FULL_README.md: the project README itself;
- app.py and the dtrak_core package (Python sources);
- assets/: the model folders the app serves, the default one and every folder under it (model,
  feature stores, TracIn checkpoints, benchmark and counterfactual results; not the LDS runs'
  retraining jobs, which only the harnesses read);
- requirements.txt: the project's pins, with torch taken from PyTorch's CPU wheel index (from the
  default index a Space would install the multi-GB CUDA build);
- .gitattributes: every binary file routed to LFS/Xet (the Hub refuses binary files in plain git).

The folder is written next to DIR and renamed into place when complete, so an interrupted export
leaves no half-written Space behind.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tempfile

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MAX_SHORT_DESCRIPTION = 60  # characters the Hub accepts
# Under the model folder, what the app never reads (the LDS harness's retraining jobs and caches).
# what only the harnesses read (retraining jobs), in the default folder and the folders under it
ASSET_EXCLUDES = ("benchmarks/lds_run", "*/benchmarks/lds_run/*", "*/lds/jobs/*", "*.log", "*.tmp", "__pycache__")
# Routed to LFS/Xet whatever the export finds (the Hub's own defaults for these kinds of files).
LFS_PATTERNS = ("*.npy", "*.npz", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.png", "*.jpg",
                "*.jpeg", "*.gif", "*.webp", "*.zip", "*.gz", "*.tar")
LFS_ATTRIBUTES = "filter=lfs diff=lfs merge=lfs -text"


# ---------------------------------------------------------------- the pieces

def read_front_matter(text: str, where: str = "README.md") -> dict:
    """The YAML front matter between the leading '---' lines of a README, as a dict."""
    import yaml

    m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not m:
        raise ValueError(f"{where} has no front matter (a block between '---' lines at the top); a Space needs one")
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: its front matter is not valid YAML ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: its front matter is not a mapping of keys to values")
    return meta


CARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui", "texts", "space_card.md")
SCREENSHOT = os.path.join("docs", "screenshot.png")  # the card's picture (the Attribute tab at 1280x900)


def _body(readme: str) -> str:
    """The README without its front matter (the Space's config)."""
    if readme.startswith("---"):
        end = readme.find("\n---", 3)
        if end != -1:
            return readme[end + 4:].lstrip("\n")
    return readme


def space_card(readme: str) -> str:
    """The Space's README: the project README's front matter (the Space's config) and a short card
    for visitors (`ui/texts/space_card.md`), which links to the full README shipped beside it."""
    front = readme[:len(readme) - len(_body(readme))].rstrip("\n")
    with open(CARD, encoding="utf-8") as f:
        return f"{front}\n\n{f.read()}"


def check_front_matter(meta: dict, where: str = "README.md") -> None:
    """The keys a Space of this app needs, with values the Hub accepts; ValueError naming the key."""
    from importlib.metadata import version  # (the installed gradio's version, without importing it)

    wanted = {"sdk": "gradio", "app_file": "app.py", "sdk_version": version("gradio")}
    for key, value in wanted.items():
        if str(meta.get(key)) != value:
            raise ValueError(f"{where}: front matter {key!r} is {meta.get(key)!r}; the Space needs {value!r}")
    short = meta.get("short_description")
    if short is not None and len(str(short)) > MAX_SHORT_DESCRIPTION:
        raise ValueError(f"{where}: short_description is {len(str(short))} characters; the Hub allows "
                         f"{MAX_SHORT_DESCRIPTION}: shorten it")


def space_requirements(text: str, where: str = "requirements.txt") -> str:
    """The project's requirements with torch from PyTorch's CPU wheel index: the index as an extra
    index and the torch pin given the '+cpu' local version (which only that index has)."""
    lines, pinned = [f"--extra-index-url {CPU_INDEX}"], False
    for line in text.splitlines():
        body = line.split("#", 1)[0].strip()
        if not body or body.startswith("--extra-index-url") or body.startswith("-r "):
            continue
        m = re.fullmatch(r"torch\s*==\s*([0-9][\w.]*)(\+\w+)?", body)
        if m:
            body, pinned = f"torch=={m.group(1)}+cpu", True
        elif re.match(r"torch\b", body):
            raise ValueError(f"{where}: pin torch to one version (torch==X.Y.Z) so the export can take its CPU wheel")
        lines.append(body)
    if not pinned:
        raise ValueError(f"{where} pins no torch version; add torch==X.Y.Z")
    return "\n".join(lines) + "\n"


def is_binary(path: str) -> bool:
    """A file git would treat as binary: a NUL byte in its first 8 KiB, or bytes that are not UTF-8."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # (a multi-byte character cut at the 8 KiB boundary is text)
    return False


def lfs_patterns(folder: str) -> list[str]:
    """The .gitattributes patterns that route every binary file under `folder` to LFS/Xet: the
    Hub's usual ones, plus one per other extension found (or the path, for a file without one)."""
    patterns = list(LFS_PATTERNS)
    for path in walk_files(folder):
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        if not is_binary(path) or any(routed(rel, p) for p in patterns):
            continue
        ext = os.path.splitext(rel)[1]
        patterns.append(f"*{ext}" if ext else rel)
    return patterns


def routed(rel: str, pattern: str) -> bool:
    """Whether a .gitattributes pattern matches a path (relative, '/'-separated): a pattern
    without '/' matches the file name in any folder, one with '/' the whole path."""
    return fnmatch.fnmatch(rel if "/" in pattern else rel.rsplit("/", 1)[-1], pattern)


def walk_files(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


def _excluded(rel: str) -> bool:
    parts = rel.split("/")
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[-1], p) or rel.startswith(p + "/")
               or p in parts for p in ASSET_EXCLUDES)


def _hidden(rel: str) -> bool:
    """A path ('/'-separated) with a hidden component: a dot-file or anything inside a dot-folder."""
    return any(part.startswith(".") for part in rel.split("/"))


def git_tracked(folder: str) -> set[str] | None:
    """The files git tracks under `folder` ('/'-separated, relative to it), or None when `folder`
    is not inside a git work tree (or git is not installed)."""
    try:
        inside = subprocess.run(["git", "-C", folder, "rev-parse", "--is-inside-work-tree"], capture_output=True,
                                text=True, timeout=60)
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None
        listed = subprocess.run(["git", "-C", folder, "ls-files", "-z", "--cached", "--", "."], capture_output=True,
                                timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    if listed.returncode != 0:
        raise ValueError(f"`git ls-files` failed in {folder}: {listed.stderr.decode(errors='replace').strip()}")
    return {os.fsdecode(p).replace(os.sep, "/") for p in listed.stdout.split(b"\0") if p}


def _refuse_link(path: str) -> None:
    raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)!r}); the Space export ships no links (one "
                     f"could publish whatever it points to): replace it with the file itself, or remove it")


def product_files(folder: str, tracked: set[str] | None, skip=lambda rel: False) -> list[str]:
    """The files of `folder` to ship, relative to it ('/'-separated), sorted: those in `tracked`
    (git's, `git_tracked`) when it is a set, else every regular file found without following links;
    never a hidden file or folder, nor one `skip(rel)` excludes. A symbolic link among them (or on
    the way to one) is a ValueError naming it."""
    out = []
    if tracked is None:
        for d, dirs, files in os.walk(folder):
            base = os.path.relpath(d, folder).replace(os.sep, "/")
            rel_of = (lambda n: n) if base == "." else (lambda n: f"{base}/{n}")
            dirs[:] = sorted(n for n in dirs if not _hidden(rel_of(n)) and not skip(rel_of(n)))
            for name in dirs + sorted(files):
                rel = rel_of(name)
                if _hidden(rel) or skip(rel):
                    continue
                if os.path.islink(os.path.join(d, name)):
                    _refuse_link(os.path.join(d, name))
                if name in files and os.path.isfile(os.path.join(d, name)):  # (not a socket, pipe or device)
                    out.append(rel)
        return sorted(out)
    for rel in sorted(tracked):
        if _hidden(rel) or skip(rel):
            continue
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):  # the file, or a folder on the way to it, may be a link
            if os.path.islink(os.path.join(folder, *parts[:i])):
                _refuse_link(os.path.join(folder, *parts[:i]))
        if os.path.isfile(os.path.join(folder, *parts)):  # (a tracked file deleted here, or a submodule: skipped)
            out.append(rel)
    return out


def _copy_files(src: str, dst: str, rels: list[str]) -> None:
    for rel in rels:
        target = os.path.join(dst, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(src, *rel.split("/")), target, follow_symlinks=False)


def _code_skip(rel: str) -> bool:
    return "__pycache__" in rel.split("/") or rel.endswith(".pyc")


# ---------------------------------------------------------------- export and push

def export(dest: str, source: str = ".", assets: str | None = None) -> dict:
    """Write the Space folder `dest` from the checkout `source` and the model folder `assets`
    (default: source/assets): the allow-list of `product_files` (git's tracked files where either
    is a git work tree). `dest` must not exist or be empty. Returns a summary: the folder, its file
    count, binary files, total bytes, the LFS patterns."""
    source = os.path.abspath(source)
    assets = os.path.abspath(assets or os.path.join(source, "assets"))
    for need in ("app.py", "README.md", "requirements.txt", os.path.join("dtrak_core", "__init__.py")):
        if not os.path.isfile(os.path.join(source, need)):
            raise ValueError(f"{source} has no {need}: run from the checkout (the folder with app.py) or pass --source")
    if not os.path.isfile(os.path.join(assets, "manifest.json")):
        raise ValueError(f"{assets} is not a model folder (no manifest.json); pass --assets, or build one with "
                         "`python -m dtrak_core build-default`")
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise ValueError(f"{dest} exists and is not an empty folder; export into a new folder")
    readme = open(os.path.join(source, "README.md"), encoding="utf-8").read()
    check_front_matter(read_front_matter(readme))
    card = space_card(readme)
    requirements = space_requirements(open(os.path.join(source, "requirements.txt"), encoding="utf-8").read())
    tracked = git_tracked(source)
    if tracked is not None and "app.py" not in tracked:
        raise ValueError(f"{source} is a git work tree whose app.py git does not track; the export ships tracked files "
                         f"only: add and commit it")
    code = product_files(os.path.join(source, "dtrak_core"), None if tracked is None else
                         {r[len("dtrak_core/"):] for r in tracked if r.startswith("dtrak_core/")}, _code_skip)
    if os.path.islink(os.path.join(source, "app.py")):
        _refuse_link(os.path.join(source, "app.py"))
    assets_tracked = git_tracked(assets)
    if assets_tracked is not None and "manifest.json" not in assets_tracked:
        raise ValueError(f"{assets} lies in a git work tree but git does not track its manifest.json; the export ships "
                         f"tracked files only: commit the model folder, or pass --assets a folder outside any "
                         f"repository")
    shipped = product_files(assets, assets_tracked, _excluded)

    from dtrak_core.files import atomic_write_bytes

    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.partial-", dir=parent)
    try:
        _copy_files(source, staging, ["app.py"])
        _copy_files(os.path.join(source, "dtrak_core"), os.path.join(staging, "dtrak_core"), code)
        _copy_files(assets, os.path.join(staging, "assets"), shipped)
        atomic_write_bytes(os.path.join(staging, "README.md"), card.encode("utf-8"))
        atomic_write_bytes(os.path.join(staging, "FULL_README.md"), _body(readme).encode("utf-8"))
        shot = os.path.join(source, SCREENSHOT)
        if os.path.isfile(shot):
            if os.path.islink(shot):
                _refuse_link(shot)
            shutil.copyfile(shot, os.path.join(staging, "screenshot.png"))
        atomic_write_bytes(os.path.join(staging, "requirements.txt"), requirements.encode("utf-8"))
        patterns = lfs_patterns(staging)
        atomic_write_bytes(os.path.join(staging, ".gitattributes"),
                           "".join(f"{p} {LFS_ATTRIBUTES}\n" for p in patterns).encode("utf-8"))
        if os.path.isdir(dest):
            os.rmdir(dest)  # empty (checked above)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = walk_files(dest)
    binary = [f for f in files if is_binary(f)]
    return {"folder": dest, "files": len(files), "binary": len(binary), "bytes": sum(os.path.getsize(f) for f in files),
            "lfs_patterns": patterns}


def push(folder: str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the Space `repo_id` (created if absent) with huggingface_hub;
    the login is huggingface_hub's own (`hf auth login` or $HF_TOKEN). Returns the Space's URL."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or ""):
        raise ValueError(f"--push takes a Space id like user/name, got {repo_id!r}")
    if not os.path.isfile(os.path.join(folder, ".gitattributes")):
        raise ValueError(f"{folder} is not an exported Space folder (no .gitattributes); export it first")
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ValueError(f"pushing needs huggingface_hub (pip install huggingface_hub): {e}") from None
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True, private=private)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="space",
                      commit_message="Export of the dtrak app (python -m dtrak_core space export)")
    return str(url)


# ---------------------------------------------------------------- command line

def add_parser(sub) -> None:
    """`space export DIR [--push REPO_ID]` under the CLI's sub-commands."""
    p = sub.add_parser("space", help="the app as a Hugging Face Space: export a folder (and push it)")
    actions = p.add_subparsers(dest="space_command", required=True)
    e = actions.add_parser("export", help="write a folder that can be pushed to a Space as it is")
    e.add_argument("dir", help="the folder to write (new or empty)")
    e.add_argument("--source", default=".", help="the checkout with app.py and dtrak_core (default: .)")
    e.add_argument("--assets", default=None, help="the model folder to ship (default: SOURCE/assets)")
    e.add_argument("--push", metavar="REPO_ID", default=None, help="then upload it to this Space (user/name)")
    e.add_argument("--private", action="store_true", help="create the Space private (with --push)")
    e.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    out = export(args.dir, args.source, args.assets)
    print(f"wrote {out['folder']}: {out['files']} files, {out['bytes'] / 2**20:.1f} MiB, {out['binary']} binary "
          f"(routed to LFS/Xet by .gitattributes: {', '.join(out['lfs_patterns'])})")
    if args.push:
        print(f"pushed to {push(out['folder'], args.push, private=args.private)}")
