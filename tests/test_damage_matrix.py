"""One table of damaged or edited files, both folder kinds (the pixel digits folder `assets/` and the
text-to-image folder `assets/text2image/`): each case truncates, flips a byte in, edits a JSON value of
or deletes one file of a copy, and expects that file's relative path in the error, through the command
line (exit 2, the message on stderr, no traceback) where it reads the file, and through the app's
loading path (its error page text or its banner's findings), with a command that fixes it written to
run as printed on the copy (its --root, or paths inside it). The copies are made once per module;
each case restores its file afterwards (the committed assets are never touched)."""
import json
import os
import re
import shutil

import pytest

from dtrak_core import cli
from tests.conftest import load_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
T2I = os.path.join(ASSETS, "text2image")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (os.path.isfile(os.path.join(ASSETS, "manifest.json"))
                                      and os.path.isfile(os.path.join(T2I, "manifest.json"))),
                                 reason="assets/ not built")]


# -- damage -----------------------------------------------------------------------------------------
def truncate(path, value=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def bitflip(path, value=None):
    """One bit of the byte 200 from the end (inside the tensor data of a weights file; a JSON file's
    text, the last bytes of an array or an image's data elsewhere), or of the last byte of a small file."""
    offset = -200 if os.path.getsize(path) > 400 else -1
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte ^ 0x01]))


def edit(path, value):
    """Set one JSON value: `value` is (dotted key, new value); the file stays valid JSON."""
    key, new = value
    with open(path) as f:
        content = json.load(f)
    *parents, last = key if isinstance(key, tuple) else key.split(".")
    node = content
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = new
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def delete(path, value=None):
    os.remove(path)


DAMAGE = {"truncate": truncate, "bitflip": bitflip, "edit": edit, "delete": delete}


# -- the table --------------------------------------------------------------------------------------
def _ls(folder):
    return sorted(os.listdir(os.path.join(ASSETS, folder)))


def _j(*parts):
    return "/".join(parts)


def _digits_cases():
    """(rel, damage, edit value, check): check is how it is read: "cli" (attribute with d-trak: the
    CLI and the app's start-up load), "tracin" / "das" (attribute with that method; the app's full / quick
    check), "results" / "jobs" (precomputed results the CLI does not read: the app's quick / full checks)."""
    cases = []
    manifest = json.load(open(os.path.join(ASSETS, "manifest.json")))
    add = lambda rel, damage, value=None, check="cli": cases.append((rel, damage, value, check))  # noqa: E731
    add("manifest.json", "truncate")
    add("manifest.json", "bitflip")
    add("manifest.json", "edit", ("train_config.steps", 10))
    add("manifest.json", "edit", (f"tuned_lambda.{manifest['stores'][0].split('/')[-1]}.lambda", 7.0))
    add("manifest.json", "delete")
    add("model/unet/config.json", "edit", ("norm_eps", 0.1))
    add("model/unet/config.json", "truncate")
    add("model/unet/config.json", "delete")
    add("model/scheduler/scheduler_config.json", "edit", ("beta_end", 0.05))
    add("model/scheduler/scheduler_config.json", "delete")
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    add(weights, "truncate")
    add(weights, "bitflip")
    add(weights, "delete")
    for store in manifest["stores"]:  # every file of every store
        add(_j(store, "features.npy"), "bitflip")
        add(_j(store, "metadata.json"), "edit", ("K", 10))
        add(_j(store, "done.npy"), "truncate")
    add(_j(manifest["stores"][0], "features.npy"), "truncate")
    add(_j(manifest["stores"][1], "metadata.json"), "delete")
    add("tracin/index.json", "truncate", check="tracin")
    add("tracin/index.json", "edit", ("checkpoints.0.step", 1), check="tracin")
    add("tracin/index.json", "edit", ("setting.K", 2), check="tracin")
    # a checkpoint's recorded hash, or the model's: the index is wrong, not the weights
    add("tracin/index.json", "edit", ("checkpoints.0.checkpoint_hash", "0123456789abcdef"), check="tracin")
    add("tracin/index.json", "edit", ("model_checkpoint_hash", "0123456789abcdef"), check="tracin")
    add("tracin/index.json", "delete", check="tracin")
    tracin = json.load(open(os.path.join(ASSETS, "tracin", "index.json")))
    for c in tracin["checkpoints"]:  # every checkpoint's weights and store features
        ckpt = _j("tracin", "checkpoints", os.path.basename(c["store"]).split("-loss")[0])
        add(_j(ckpt, "unet", "diffusion_pytorch_model.safetensors"), "bitflip", check="tracin")
        add(_j(c["store"], "features.npy"), "bitflip", check="tracin")
    first = tracin["checkpoints"][0]
    ckpt = _j("tracin", "checkpoints", os.path.basename(first["store"]).split("-loss")[0])
    add(_j(ckpt, "unet", "config.json"), "edit", ("norm_eps", 0.1), check="tracin")
    add(_j(ckpt, "scheduler", "scheduler_config.json"), "edit", ("beta_end", 0.05), check="tracin")
    add(_j(first["store"], "metadata.json"), "edit", ("K", 2), check="tracin")
    add(_j(first["store"], "done.npy"), "delete", check="tracin")
    add("das_residuals.npz", "truncate", check="das")
    add("das_residuals.npz", "bitflip", check="das")
    add("das_residuals.npz", "delete", check="das")
    # precomputed results, each folder checksummed by its writer
    jobs = [n for n in _ls("counterfactual/jobs") if n.endswith(".npz") and not n.startswith("control")]
    add("counterfactual/jobs/identity.json", "edit", ("sampling", "ddim-10"), check="results")
    add("counterfactual/jobs/identity.json", "truncate", check="results")
    add("counterfactual/jobs/checksums.json", "delete", check="jobs")
    add("counterfactual/jobs/checksums.json", "edit", (("sha256", jobs[0]), "0" * 64), check="jobs")
    for name, damage in zip(jobs[:: len(jobs) // 3][:3], ("truncate", "bitflip", "delete")):
        add(_j("counterfactual/jobs", name), damage, check="jobs")
    gallery = json.load(open(os.path.join(ASSETS, "counterfactual", "gallery", "gallery.json")))
    add("counterfactual/gallery/gallery.json", "edit", ("entries.0.l2", 99.0), check="results")
    add("counterfactual/gallery/checksums.json", "delete", check="results")
    entry = gallery["entries"][0]
    pngs = [v for k, v in sorted(entry.items()) if k.endswith("_png")]
    for name, damage in zip(pngs, ("truncate", "bitflip", "delete")):
        add(_j("counterfactual/gallery", name), damage, check="results")
    add("counterfactual/summary.json", "edit", ("cells.0.label_changed", 0.99), check="results")
    add("counterfactual/summary.json", "truncate", check="results")
    add("benchmarks/tables.json", "bitflip", check="results")
    add("benchmarks/tables.json", "edit", ("methods.pixel-cosine.validation.lds", 99.0), check="results")  # sealed
    add("benchmarks/tables.json", "edit", ("evidence.rows.0.validation/signed", 99.0), check="results")
    add("benchmarks/checksums.json", "delete", check="results")  # the legacy results it lists are named
    # the legacy results (recorded with `checksums FILE`): the evidence also feeds the similarity flag and About
    add("benchmarks/evidence.json", "edit", ("rows.0.validation/signed", 99.0), check="results")
    add("benchmarks/evidence.json", "delete", check="results")
    add("benchmarks/lds_results.json", "edit", ("methods.d-trak.validation.honest.lds", 99.0), check="results")
    add("benchmarks/sharpening.json", "edit", ("lds_sharpened_scores.0.validation", 99.0), check="results")
    add("benchmarks/study.json", "truncate", check="results")
    return cases


def _t2i_cases():
    """(rel, damage, edit value, check): every component, config, the LoRA and every store file ("cli":
    the command line and the page's loading), and the precomputed results ("results": the page's banner)."""
    cases = []
    manifest = json.load(open(os.path.join(T2I, "manifest.json")))
    add = lambda rel, damage, value=None, check="cli": cases.append((rel, damage, value, check))  # noqa: E731
    add("manifest.json", "truncate")
    add("manifest.json", "edit", ("guidance_scale", 9.0))
    add("manifest.json", "delete")
    for component in ("unet", "vae"):
        add(_j("pipeline", component, "diffusion_pytorch_model.safetensors"), "bitflip")
        add(_j("pipeline", component, "diffusion_pytorch_model.safetensors"), "truncate")
        add(_j("pipeline", component, "config.json"), "edit", ("norm_eps", 0.1))
    add("pipeline/unet/diffusion_pytorch_model.safetensors", "delete")
    add("pipeline/vae/diffusion_pytorch_model.safetensors", "delete")
    add("pipeline/text_encoder/model.safetensors", "truncate")
    add("pipeline/text_encoder/model.safetensors", "bitflip")
    add("pipeline/text_encoder/model.safetensors", "delete")
    add("pipeline/text_encoder/config.json", "edit", ("layer_norm_eps", 0.1))
    add("pipeline/tokenizer/tokenizer.json", "edit", ("model.vocab.5", 7))
    add("pipeline/tokenizer/tokenizer.json", "truncate")
    add("pipeline/tokenizer/tokenizer_config.json", "edit", ("model_max_length", 3))
    add("pipeline/scheduler/scheduler_config.json", "edit", ("beta_end", 0.05))
    add("pipeline/scheduler/scheduler_config.json", "delete")
    add("pipeline/model_index.json", "truncate")
    add("pipeline/model_index.json", "edit", ("_diffusers_version", "0.0.1"))
    lora = "lora/pytorch_lora_weights.safetensors"
    add(lora, "bitflip")
    add(lora, "truncate")
    add(lora, "delete")
    for store in manifest["stores"]:
        add(_j(store, "features.npy"), "bitflip")
        add(_j(store, "metadata.json"), "edit", ("K", 10))
        add(_j(store, "done.npy"), "truncate")
    add(_j(manifest["stores"][0], "features.npy"), "delete")
    # the precomputed results its Benchmarks tab shows (read by the page, not by the command line)
    add("benchmarks/evidence.json", "edit", ("rows.0.validation/signed", 99.0), "results")
    add("benchmarks/checksums.json", "delete", check="results")
    if os.path.isfile(os.path.join(T2I, "lds", "lds_results.json")):
        add("lds/lds_results.json", "edit", ("methods.d-trak.validation.honest.lds", 99.0), "results")
        add("lds/lds_results.json", "truncate", check="results")
    return cases


GAPS = {}  # (kind, rel, damage) -> xfail marks for a known gap (strict: a fixed gap fails until removed)


def _params():
    out = []
    for kind, cases in (("digits", _digits_cases()), ("text2image", _t2i_cases())):
        for rel, damage, value, check in cases:
            marks = GAPS.get((kind, rel, damage), ())
            out.append(pytest.param(kind, rel, damage, value, check, marks=marks,
                                    id=f"{kind}:{rel}:{damage}" + (f":{value[0]}" if value and isinstance(value[0], str)
                                                                   else "")))
    return out


def _gap(reason):
    return pytest.mark.xfail(strict=True, reason=reason)


CASES = _params()


# -- the folders ------------------------------------------------------------------------------------
def _copy_digits(dest):
    keep = ("manifest.json", "model", "stores", "tracin", "das_residuals.npz", "counterfactual")
    os.makedirs(dest)
    for name in keep:
        src = os.path.join(ASSETS, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(dest, name))
    os.makedirs(os.path.join(dest, "benchmarks"))
    for name in _ls("benchmarks"):  # every result the Benchmarks tab shows, and the sidecar of the legacy ones
        if name.endswith(".json"):
            shutil.copy2(os.path.join(ASSETS, "benchmarks", name), os.path.join(dest, "benchmarks", name))
    return dest


def _copy_t2i(dest):
    """The text-to-image folder without its LDS run (its jobs), but with the results the page shows."""
    shutil.copytree(T2I, dest, ignore=shutil.ignore_patterns("lds", "README.md"))
    lds = os.path.join(T2I, "lds")
    if os.path.isfile(os.path.join(lds, "lds_results.json")):
        os.makedirs(os.path.join(dest, "lds"))
        for name in ("lds_results.json", "checksums.json"):
            if os.path.isfile(os.path.join(lds, name)):
                shutil.copy2(os.path.join(lds, name), os.path.join(dest, "lds", name))
    return dest


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("damage_matrix")
    digits = _copy_digits(str(base / "digits"))
    t2i = _copy_t2i(str(base / "text2image"))
    return {"digits": digits, "text2image": t2i}


@pytest.fixture(scope="module")
def app(folders):
    before = os.environ.get("DTRAK_ASSETS")
    os.environ["DTRAK_ASSETS"] = folders["digits"]
    try:
        module = load_app()
        yield module
    finally:
        if before is None:
            os.environ.pop("DTRAK_ASSETS", None)
        else:
            os.environ["DTRAK_ASSETS"] = before


def _clear(app):
    for cached in (app.load_assets, app.committed, app.full_check, app.precomputed, app.outcomes):
        cached.cache_clear()
    app.damaged_results.clear()
    app.damaged_gallery.clear()


def _names(text: str, rel: str) -> bool:
    """The file is named: its relative path, or its folder's with its file name beside it
    ("<folder> has no weights file (<name>)")."""
    text = text.replace(os.sep, "/")
    folder, name = rel.rsplit("/", 1) if "/" in rel else ("", rel)
    return rel in text or (folder in text and name in text)


def _fix_runs_on(text: str, rel: str, root: str) -> None:
    """Every line of `text` that names the damaged file says what fixes it with a dtrak command
    (in backticks) written for this folder: each such command names the folder (--root <root>) or a
    path inside it (checksums FOLDER, --out), since the copy is not the default folder."""
    lines = [line for line in text.splitlines() if _names(line, rel)]
    assert lines, text
    for line in lines:
        commands = re.findall(r"`(python -m dtrak_core [^`]*)`", line)
        assert commands, f"no command that fixes {rel}: {line}"
        for command in commands:
            assert f"--root {root}" in command or f"{root}{os.sep}" in command, \
                f"the command for {rel} does not run on {root}: {command!r} in {line}"


def _app_findings(app, kind, root, check) -> str:
    """What the app shows for the folder: its error page's text when it cannot load it, else every
    finding of its banner (the full check: every file read)."""
    if kind == "text2image":
        from dtrak_core.ui import text2image as app_views
        from dtrak_core.ui.text2image import folder as t2i_folder

        t2i_folder._folders = type(t2i_folder._folders)()  # (loaded afresh: the copy was damaged)
        try:
            app_views.load(root)
        except (ValueError, OSError) as e:
            return str(e)
        if check == "results":  # the page's banner over its tabs
            return "\n".join(f"{part}: {why}" for part, why in app_views.results_damage(root).items())
        return ""
    _clear(app)
    try:
        a = app.load_assets(root)
        full = check in ("tracin", "jobs")  # what only the full check reads (it costs seconds)
        damaged = app.full_check(root) if full else {**a.damaged, **app.quick_damage(root)}
        if check == "das":  # the methods a file lacks or damages are listed off, with the reason
            damaged = {**a.unavailable, **damaged}
    except (ValueError, OSError) as e:
        return str(e)
    finally:
        _clear(app)
    return "\n".join(f"{part}: {why}" for part, why in damaged.items())


def _cli_argv(kind, root, check):
    if kind == "text2image":
        return ["attribute", "--root", root, "--prompt", "a handwritten digit 7", "--seed", "0", "--top", "3"]
    method = {"tracin": "tracin", "das": "das"}.get(check, "d-trak")
    return ["attribute", "--root", root, "--seed", "1", "--method", method, "--top", "3"]


def test_the_table_covers_both_kinds_and_every_damage():
    kinds = {p.values[0] for p in CASES}
    damages = {(p.values[0], p.values[2]) for p in CASES}
    assert len(CASES) >= 60 and kinds == {"digits", "text2image"}
    assert {(k, d) for k in kinds for d in DAMAGE} <= damages


@pytest.mark.parametrize("kind, rel, damage, value, check", CASES)
def test_a_damaged_file_is_named(folders, app, capsys, kind, rel, damage, value, check):
    root = folders[kind]
    path = os.path.join(root, *rel.split("/"))
    with open(path, "rb") as f:
        original = f.read()
    try:
        DAMAGE[damage](path, value)
        if check not in ("results", "jobs"):  # the command line reads it
            code = cli.main(_cli_argv(kind, root, check))
            captured = capsys.readouterr()
            assert "Traceback" not in captured.err
            assert code == 2, f"the damaged {rel} was used: {captured.out[:300]}"
            assert _names(captured.err, rel), captured.err
            _fix_runs_on(captured.err, rel, root)
        shown = _app_findings(app, kind, root, check)
        assert "Traceback" not in shown
        assert _names(shown, rel), shown or "the app reports nothing"
        _fix_runs_on(shown, rel, root)
    finally:
        with open(path, "wb") as f:
            f.write(original)


@pytest.mark.parametrize("kind", ["digits", "text2image"])
def test_the_benchmarks_sidecar_lists_the_legacy_results_only(folders, app, kind):
    """The committed results show as their writers wrote them; a sealed one (the digits' tables.json)
    carries its own checksum and is not in the sidecar, so deleting the sidecar names every legacy
    result it recorded (each then unverifiable), never the sealed one."""
    root = folders[kind]
    sidecar = os.path.join(root, "benchmarks", "checksums.json")
    assert _app_findings(app, kind, root, "results") == ""
    recorded = set(json.load(open(sidecar))["sha256"])
    assert "evidence.json" in recorded and "tables.json" not in recorded
    with open(sidecar, "rb") as f:
        original = f.read()
    try:
        os.remove(sidecar)
        shown = _app_findings(app, kind, root, "results").replace(os.sep, "/")
        for name in recorded:
            assert f"benchmarks/{name} (" in shown and "benchmarks/checksums.json is missing" in shown, shown
        assert "benchmarks/tables.json" not in shown and "Benchmarks: LDS tables" not in shown
    finally:
        with open(sidecar, "wb") as f:
            f.write(original)


@pytest.mark.parametrize("key", ["checkpoints.0.checkpoint_hash", "model_checkpoint_hash"])
def test_the_command_named_for_an_edited_tracin_index_rebuilds_it(folders, capsys, key):
    """The reported defect: an edited checkpoint hash in the TracInCP index was blamed on the
    checkpoint's weights (restore them). Now the index is named, and the command its message gives,
    run as printed, rewrites it from the checkpoints and stores (which agree with each other) without
    replaying the training run: the index comes back byte for byte."""
    import shlex

    root = folders["digits"]
    path = os.path.join(root, "tracin", "index.json")
    with open(path, "rb") as f:
        original = f.read()
    try:
        edit(path, (key, "0123456789abcdef"))
        assert cli.main(_cli_argv("digits", root, "tracin")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} (TracInCP index)") and "weights) hashes" not in err, err
        command = re.findall(r"`(python -m dtrak_core build-baselines[^`]*)`", err)
        assert command == [f"python -m dtrak_core build-baselines --root {root}"], err
        assert cli.main(shlex.split(command[0])[3:]) == 0
        with open(path, "rb") as f:
            assert f.read() == original
        assert cli.main(_cli_argv("digits", root, "tracin")) == 0
    finally:
        with open(path, "wb") as f:
            f.write(original)
