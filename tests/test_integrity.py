"""Every file of a model folder is verified on load: damage or a mismatch is an `IntegrityError`
(a ValueError) that names the file, says what it is and what to do; nothing is silently skipped
or silently trusted. Each test damages one file of a copy of a tiny but complete model folder."""
import hashlib
import json
import os
import shutil
import struct
import zipfile

import numpy as np
import pytest

from dtrak_core import cli
from dtrak_core.attribution import methods
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.store import FeatureStore, find_stores
from dtrak_core.attribution.tracin import TRACIN_INDEX, build_tracin, load_tracin
from dtrak_core.build import build_store, train_or_load
from dtrak_core.errors import IntegrityError
from dtrak_core.evaluation import counterfactual as cf
from dtrak_core.evaluation.counterfactual_report import summarize
from dtrak_core.evaluation.lds_run import collect
from dtrak_core.evaluation.retrain import RetrainJob, run_jobs
from dtrak_core.files import load_result, save_result
from dtrak_core.model.data import load_digits
from dtrak_core.model.training import TrainConfig
from dtrak_core.model.unet import checkpoint_hash, load_checkpoint
from tests.conftest import load_app

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TINY_TRAIN = TrainConfig(steps=6, batch_size=16, block_out_channels=(4, 8))
SETTING = FeatureSetting("square", K=4, k=32)
TRACIN = FeatureSetting("loss", K=2, k=8)
RETRAIN = TrainConfig(steps=5, batch_size=16, block_out_channels=(4, 8))
WEIGHTS = os.path.join("model", "unet", "diffusion_pytorch_model.safetensors")
JOBS = os.path.join("counterfactual", "jobs")
JOB = "random-k30-seed1000.npz"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pristine(one_thread, tmp_path_factory):
    """A complete tiny model folder: model, a store, TracInCP checkpoints + stores, one counterfactual job."""
    root = str(tmp_path_factory.mktemp("integrity") / "folder")
    unet, scheduler, _ = train_or_load(root, TINY_TRAIN, show_bar=False)
    build_store(root, unet, scheduler, SETTING, show_bar=False)
    build_tracin(root, load_digits("train"), scheduler, TINY_TRAIN, expected_final=checkpoint_hash(unet), steps=(3, 6),
                 setting=TRACIN, show_bar=False)
    cf.run_counterfactual(Attributor.load(root), os.path.join(root, JOBS), seeds=[1000], rankings=("random",), ks=(30,),
                          config=RETRAIN, control=False, show_bar=False)
    return root


@pytest.fixture
def folder(pristine, tmp_path):
    """A fresh copy of the model folder to damage."""
    return shutil.copytree(pristine, str(tmp_path / "folder"))


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte ^ 0xFF]))


def _flip_in_array(path, name="after.npy"):
    """Flip the last data byte of one array inside an .npz (a zip of .npy files)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local header's file name and extra field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.compress_size - 1
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0xFF]))


def _edit_json(path, **changes):
    with open(path) as f:
        obj = json.load(f)
    obj.update(changes)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_intact_folder_loads(folder):
    attributor = Attributor.load(folder)
    assert attributor.methods == ["square"] and len(load_tracin(folder, attributor)) == 2
    assert list(cf.committed_results(attributor, os.path.join(folder, JOBS), RETRAIN)) == [(1000, "random", 30)]


# -- the manifest and the checkpoint --------------------------------------------------------------
@pytest.mark.parametrize("content, problem", [(b"", "is empty"), (b'{"checkpoint": "mo', "is not valid JSON"),
                                              (b"[]", "is not a JSON object"),
                                              (b'{"dataset": "digits-train", "stores": []}', "has no valid 'checkpoint'")])
def test_damaged_manifest_is_named(folder, content, problem):
    path = os.path.join(folder, "manifest.json")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(IntegrityError, match=f"^{path} \\(model manifest\\) {problem}.*build-default") as e:
        Attributor.load(folder)
    assert e.value.path == path


@pytest.mark.parametrize("rel, damage, what", [
    (WEIGHTS, _truncate, "UNet weights"),
    (os.path.join("model", "unet", "config.json"), _truncate, "UNet config"),
    (os.path.join("model", "scheduler", "scheduler_config.json"), lambda p: open(p, "w").write("{oops"),
     "noise schedule config"),
])
def test_damaged_checkpoint_file_is_named(folder, rel, damage, what):
    path = os.path.join(folder, rel)
    damage(path)
    with pytest.raises(IntegrityError, match=f"^{path} \\({what}\\) .*truncated or corrupt.*restore the checkpoint folder"):
        load_checkpoint(os.path.join(folder, "model"))
    with pytest.raises(IntegrityError, match=f"^{path} "):
        Attributor.load(folder)


def test_replaced_weights_that_still_load_are_refused(folder):
    """A bit flipped in the tensor data still loads; the manifest's checkpoint_hash catches it."""
    _flip_last_byte(os.path.join(folder, WEIGHTS))
    load_checkpoint(os.path.join(folder, "model"))  # loads...
    unet_dir = os.path.join(folder, "model", "unet")
    with pytest.raises(IntegrityError, match=f"^{unet_dir} \\(model weights\\) hashes to .* records checkpoint_hash"):
        Attributor.load(folder)  # ...but is not trusted
    with pytest.raises(IntegrityError, match="records checkpoint_hash"):
        train_or_load(folder, TINY_TRAIN, show_bar=False)  # nor reused by a build


@pytest.mark.parametrize("rel, what, change", [
    (os.path.join("model", "unet", "config.json"), "UNet config", {"norm_eps": 0.1}),
    (os.path.join("model", "scheduler", "scheduler_config.json"), "noise schedule config", {"beta_end": 0.05}),
])
def test_an_edited_config_is_refused_naming_it(folder, capsys, rel, what, change):
    """The reported defect: norm_eps or beta_end edited in a config changed every answer with no warning;
    the manifest's config_hash seals both config files."""
    path = os.path.join(folder, rel)
    with open(path) as f:
        original = json.load(f)
    _edit_json(path, **change)
    load_checkpoint(os.path.join(folder, "model"))  # still a valid checkpoint...
    pattern = (f"^{path} \\({what}\\) hashes to \\w+, but {os.path.join(folder, 'manifest.json')} records config_hash "
               f"\\w+ for it \\(the config was edited.*restore the config file.*build-default")
    with pytest.raises(IntegrityError, match=pattern) as e:
        Attributor.load(folder)  # ...but not the one the folder was built with
    assert e.value.path == path
    with pytest.raises(IntegrityError, match=pattern):
        train_or_load(folder, TINY_TRAIN, show_bar=False)  # nor reused by a build
    code, err = _run(capsys, "attribute", "--root", folder, "--seed", "3", "--top", "3")
    assert code == 2 and f"error: {path} ({what}) hashes to" in err
    with open(path, "w") as f:  # re-indented and reordered, the same content is the same config
        json.dump(dict(reversed(list(original.items()))), f, indent=7)
    Attributor.load(folder)


def test_a_folder_recorded_without_config_hash_still_loads(folder):
    """Folders built before config_hash existed keep loading (their configs are not checked)."""
    manifest = os.path.join(folder, "manifest.json")
    with open(manifest) as f:
        content = json.load(f)
    assert set(content["config_hash"]) == {"unet/config.json", "scheduler/scheduler_config.json"}
    del content["config_hash"]
    with open(manifest, "w") as f:
        json.dump(content, f)
    _edit_json(os.path.join(folder, "model", "unet", "config.json"), norm_eps=0.1)  # (unchecked)
    assert Attributor.load(folder).methods == ["square"]


def test_a_hand_edited_recipe_is_refused_and_rebuilt_by_build_default(folder):
    manifest = os.path.join(folder, "manifest.json")
    with open(manifest) as f:
        content = json.load(f)
    content["train_config"]["steps"] = 2
    with open(manifest, "w") as f:
        json.dump(content, f)
    with pytest.raises(IntegrityError, match=f"^{manifest} \\(model manifest\\) entry 'train_config' hashes to .*"
                                             f"build-default --root {folder}"):
        Attributor.load(folder)
    train_or_load(folder, TINY_TRAIN, show_bar=False)  # the fix it names: the model is trained again, the recipe resealed
    rebuilt = json.load(open(manifest))
    assert rebuilt["train_config"]["steps"] == TINY_TRAIN.steps and "train_config" in rebuilt["settings_hash"]


def test_edited_store_metadata_is_refused_on_load(folder):
    """The reported defect: K edited in a complete store's metadata.json used to change the proponents."""
    meta = os.path.join(folder, "stores", SETTING.slug, "metadata.json")
    _edit_json(meta, K=2)
    with pytest.raises(IntegrityError, match=f"^{meta} \\(feature store metadata\\) does not match its recorded "
                                             f"metadata_sha256"):
        Attributor.load(folder)


# -- TracInCP -------------------------------------------------------------------------------------
def test_damaged_tracin_files_are_named(folder):
    attributor = Attributor.load(folder)
    index = os.path.join(folder, TRACIN_INDEX)
    good = open(index).read()
    with open(index, "w") as f:
        f.write(good[:40])
    with pytest.raises(IntegrityError, match=f"^{index} \\(TracInCP index\\) is not valid JSON.*build-baselines"):
        load_tracin(folder, attributor)
    with open(index, "w") as f:
        f.write(json.dumps({**json.loads(good), "checkpoints": [{"step": 3}]}))
    with pytest.raises(IntegrityError, match=r"\(TracInCP index\) lacks or garbles checkpoints\[0\]"):
        load_tracin(folder, attributor)
    os.remove(index)
    with pytest.raises(IntegrityError, match=f"^{index} \\(TracInCP index\\) is missing, though .*manifest.json registers it"):
        load_tracin(folder, attributor)
    with open(index, "w") as f:
        f.write(good)
    early, final = (os.path.join(folder, "tracin", "checkpoints", s, "unet", "diffusion_pytorch_model.safetensors")
                    for s in ("step-00003", "step-00006"))
    shutil.copyfile(early, final)  # a checkpoint swapped for another one
    with pytest.raises(IntegrityError, match=r"step-00006/unet \(TracInCP checkpoint weights\) hashes to .* records"):
        load_tracin(folder, attributor)
    # the quick check (the app's, at start-up) reads the index only; the full one loads the weights
    assert "tracin" not in methods.problems(attributor, folder, quick=True)
    assert "hashes to" in str(methods.problems(attributor, folder)["tracin"])
    shutil.rmtree(os.path.dirname(os.path.dirname(final)))
    assert "(TracInCP checkpoint) is missing" in str(methods.problems(Attributor.load(folder), folder, quick=True)["tracin"])


# -- counterfactual results -----------------------------------------------------------------------
def test_damaged_identity_is_an_error_not_an_empty_result(folder):
    """A damaged identity.json used to discard every precomputed job silently ({})."""
    attributor = Attributor.load(folder)
    jobs = os.path.join(folder, JOBS)
    identity = os.path.join(jobs, "identity.json")
    with open(identity, "w") as f:
        f.write("")
    pattern = f"^{identity} \\(counterfactual results' identity\\) is empty.*cannot be checked"
    with pytest.raises(IntegrityError, match=pattern):
        cf.committed_results(attributor, jobs, RETRAIN)
    with pytest.raises(IntegrityError, match=pattern):
        cf.load_precomputed(attributor, 1000, "random", 30, out_dir=jobs, config=RETRAIN)
    with pytest.raises(IntegrityError, match=pattern):  # nor overwritten by a new run
        cf.run_counterfactual(attributor, jobs, [1000], ("random",), (30,), RETRAIN, control=False, show_bar=False)
    os.remove(identity)
    with pytest.raises(IntegrityError, match=f"^{identity} .*is missing beside their job files"):
        cf.committed_results(attributor, jobs, RETRAIN)


@pytest.mark.parametrize("damage, problem", [(_truncate, "is not a readable result file"),
                                             (_flip_in_array, "is not a readable result file"),
                                             ("drop-key", r"\(result file\) lacks after")])
def test_damaged_job_result_is_named_not_skipped(folder, damage, problem):
    attributor = Attributor.load(folder)
    jobs = os.path.join(folder, JOBS)
    path = os.path.join(jobs, JOB)
    if damage == "drop-key":
        save_result(path, **{k: v for k, v in load_result(path).items() if k != "after"})
    else:
        damage(path)
    with pytest.raises(IntegrityError, match=f"^{path} {problem}.*rerun"):
        cf.committed_results(attributor, jobs, RETRAIN)
    with pytest.raises(IntegrityError, match=f"^{path} "):
        summarize(jobs)


def test_job_files_carry_the_checksums_their_writer_recorded(folder):
    jobs = os.path.join(folder, JOBS)
    recorded = json.load(open(os.path.join(jobs, "checksums.json")))["sha256"]
    assert set(recorded) == {JOB, "identity.json"}
    assert recorded[JOB] == hashlib.sha256(open(os.path.join(jobs, JOB), "rb").read()).hexdigest()


@pytest.mark.parametrize("field, edit", [("l2", lambda v: 42.0), ("label_after", lambda v: (int(v) + 1) % 10),
                                         ("removed", lambda v: v[::-1])])
def test_a_resaved_job_with_edited_numbers_is_refused_naming_it(folder, field, edit):
    """The reported defect: a job file re-saved with l2 42 (a valid zip, its CRCs right) was shown as a result."""
    attributor = Attributor.load(folder)
    jobs = os.path.join(folder, JOBS)
    path = os.path.join(jobs, JOB)
    arrays = load_result(path)
    save_result(path, **{**arrays, field: np.asarray(edit(arrays[field]))})
    pattern = (rf"^{path} \(counterfactual job result\) hashes to \w+, not to its checksum \w+ in "
               rf"{os.path.join(jobs, 'checksums.json')} \(it was edited, re-saved.*delete it and rerun")
    with pytest.raises(IntegrityError, match=pattern):
        cf.committed_results(attributor, jobs, RETRAIN)
    with pytest.raises(IntegrityError, match=pattern):
        cf.load_precomputed(attributor, 1000, "random", 30, out_dir=jobs, config=RETRAIN)
    with pytest.raises(IntegrityError, match=pattern):
        summarize(jobs)
    with pytest.raises(IntegrityError, match=f"^{path} \\(job result\\) hashes to"):  # nor skipped as finished
        cf.run_counterfactual(attributor, jobs, [1000], ("random",), (30,), RETRAIN, control=False, show_bar=False)


def test_an_edited_identity_or_an_unrecorded_job_is_refused(folder):
    attributor = Attributor.load(folder)
    jobs = os.path.join(folder, JOBS)
    identity = os.path.join(jobs, "identity.json")
    original = open(identity).read()
    _edit_json(identity, sampling="ddim-50 (edited)")
    with pytest.raises(IntegrityError, match=rf"^{identity} \(counterfactual results' identity\) hashes to"):
        cf.committed_results(attributor, jobs, RETRAIN)
    open(identity, "w").write(original)
    assert list(cf.committed_results(attributor, jobs, RETRAIN)) == [(1000, "random", 30)]
    shutil.copyfile(os.path.join(jobs, JOB), os.path.join(jobs, "random-k30-seed1001.npz"))  # added by hand
    with pytest.raises(IntegrityError, match=r"random-k30-seed1001.npz \(counterfactual job result\) has no checksum in"):
        cf.committed_results(attributor, jobs, RETRAIN)
    os.remove(os.path.join(jobs, "random-k30-seed1001.npz"))
    os.remove(os.path.join(jobs, "checksums.json"))
    with pytest.raises(IntegrityError, match="has no recorded checksum .*python -m dtrak_core.checksums "):
        cf.committed_results(attributor, jobs, RETRAIN)


def test_a_resumed_run_adopts_the_jobs_an_older_dtrak_wrote(folder):
    """A results folder from before checksums were recorded: the harness resuming in it reads each job
    whole and records it, so that the folder's readers can verify every job."""
    from dtrak_core import checksums

    attributor = Attributor.load(folder)
    jobs = os.path.join(folder, JOBS)
    os.remove(os.path.join(jobs, "checksums.json"))
    assert cf.run_counterfactual(attributor, jobs, [1000], ("random",), (30,), RETRAIN, control=False,
                                 show_bar=False) == []  # nothing to rerun
    assert set(checksums.read_sidecar(jobs)) == {JOB, "identity.json"}
    assert list(cf.committed_results(attributor, jobs, RETRAIN)) == [(1000, "random", 30)]


def test_the_checksum_recorder_reads_each_file_whole_first(folder, capsys):
    """`python -m dtrak_core checksums FOLDER`: for results written before checksums were recorded."""
    from dtrak_core.cli import main

    attributor = Attributor.load(folder)
    jobs = os.path.join(folder, JOBS)
    os.remove(os.path.join(jobs, "checksums.json"))
    assert main(["checksums", jobs]) == 0 and "2 file(s)" in capsys.readouterr().out
    assert list(cf.committed_results(attributor, jobs, RETRAIN)) == [(1000, "random", 30)]
    os.remove(os.path.join(jobs, "checksums.json"))
    _truncate(os.path.join(jobs, JOB))
    assert main(["checksums", jobs]) == 2 and "is not a readable result file" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(jobs, "checksums.json"))  # nothing recorded for a damaged folder


def test_a_json_written_whole_is_sealed_and_out_of_the_sidecar(tmp_path, capsys):
    """The rule of `checksums`: a JSON result written whole by one writer carries its own checksum and
    is not listed in its folder's sidecar (an entry an older writer recorded there is dropped); an
    edited value is refused naming it, with no sidecar to consult."""
    from dtrak_core import checksums
    from dtrak_core.cli import main

    folder = str(tmp_path)
    path = os.path.join(folder, "evidence.json")
    with open(path, "w") as f:
        json.dump({"rows": [{"method": "square", "validation/signed": 1.0}]}, f)  # a legacy result...
    assert main(["checksums", path]) == 0  # ...recorded in the sidecar, beside a job file's entry
    save_result(os.path.join(folder, "a.npz"), x=np.zeros(2))
    checksums.record(folder, ["a.npz"])
    assert set(checksums.read_sidecar(folder)) == {"evidence.json", "a.npz"}
    content = {"rows": [{"method": "square", "validation/signed": np.float64(2.5)}], "sets": ("validation",)}
    written = checksums.write_sealed_json(path, content)
    assert set(checksums.read_sidecar(folder)) == {"a.npz"}  # its old entry is gone, the folder's others kept
    os.remove(os.path.join(folder, "checksums.json"))  # a sealed file needs no sidecar
    read = checksums.read_sealed_json(path, "evidence", "rewrite it", required=True)
    assert read == {"rows": [{"method": "square", "validation/signed": 2.5}], "sets": ["validation"]}
    assert written == {**read, checksums.FIELD: checksums.json_digest(read)}
    # recording the folder again leaves the sealed file out (verified against its own checksum)
    assert main(["checksums", folder]) == 0 and set(checksums.read_sidecar(folder)) == {"a.npz"}
    capsys.readouterr()
    edited = json.load(open(path))
    edited["rows"][0]["validation/signed"] = 99.0
    json.dump(edited, open(path, "w"))
    with pytest.raises(IntegrityError, match=f"^{path} \\(evidence\\) does not match its own content_sha256"):
        checksums.read_sealed_json(path, "evidence", "rewrite it")
    assert main(["checksums", path]) == 2 and path in capsys.readouterr().err  # nor is an edit recorded


def test_a_bit_flip_inside_a_result_is_caught_by_the_zip_crc(tmp_path):
    path = str(tmp_path / "r.npz")
    save_result(path, a=np.arange(1000, dtype=np.float64), b=np.zeros(3))
    _flip_in_array(path, "a.npy")
    with pytest.raises(IntegrityError, match="r.npz is not a readable result file.*CRC"):
        load_result(path)


def test_job_runner_refuses_a_damaged_result_instead_of_skipping_it(tmp_path):
    out = str(tmp_path / "jobs")
    jobs = [RetrainJob(f"j{i}", np.arange(3)) for i in range(3)]
    run_jobs(jobs, out, lambda job: {"n": np.array(int(job.id[1:]))}, show_bar=False)
    _truncate(os.path.join(out, "j1.npz"))
    with pytest.raises(IntegrityError, match="j1.npz is not a readable result file.*delete it and rerun"):
        run_jobs(jobs, out, lambda job: pytest.fail("a job ran"), show_bar=False)


def test_damaged_lds_setup_is_named(tmp_path):
    path = tmp_path / "setup.json"
    path.write_text('{"lds_config": ')
    with pytest.raises(IntegrityError, match=f"^{path} \\(LDS run setup\\) is not valid JSON"):
        collect(str(tmp_path))


# -- the command line: a clear message and a non-zero exit, never a traceback --------------------
def _run(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_featurize_into_a_missing_root(capsys, tmp_path):
    code, err = _run(capsys, "featurize", "--root", str(tmp_path / "nope"), "--K", "4", "--k", "32")
    assert code == 2 and f"--root '{tmp_path / 'nope'}' does not exist; build a model folder there first" in err
    code, err = _run(capsys, "featurize", "--root", str(tmp_path), "--K", "4", "--k", "32")
    assert code == 2 and "is not a model folder (no manifest.json)" in err


def test_featurize_with_a_damaged_manifest(capsys, folder):
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        f.write("{")
    code, err = _run(capsys, "featurize", "--root", folder, "--K", "4", "--k", "32")
    assert code == 2 and f"error: {os.path.join(folder, 'manifest.json')} (model manifest) is not valid JSON" in err


def test_featurize_where_the_store_cannot_be_written(capsys, folder):
    shutil.rmtree(os.path.join(folder, "stores"))
    open(os.path.join(folder, "stores"), "w").close()  # a file where the stores folder goes
    code, err = _run(capsys, "featurize", "--root", folder, "--K", "4", "--k", "32")
    assert code == 2 and f"{os.path.join(folder, 'stores')!r} is a file, not a folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (the check is os.access)")
def test_featurize_into_a_read_only_root(capsys, folder):
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, 0o555)
    try:
        code, err = _run(capsys, "featurize", "--root", folder, "--K", "4", "--k", "32")
    finally:
        for dirpath, dirnames, filenames in os.walk(folder):
            os.chmod(dirpath, 0o755)
    assert code == 2 and "cannot be written" in err and "pass a folder you can write to" in err


def test_an_os_error_midway_is_a_message(capsys, folder, monkeypatch):
    """A disk that fills up or turns read-only after the up-front checks: the file and the reason."""
    from dtrak_core import build

    target = os.path.join(folder, "stores", "x", "features.npy")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", target)

    monkeypatch.setattr(build, "build_store", full_disk)
    code, err = _run(capsys, "featurize", "--root", folder, "--K", "4", "--k", "32")
    assert code == 2 and err.strip() == f"error: {target}: No space left on device"


@pytest.mark.parametrize("command", [["build-default", "--steps", "2"],
                                     ["build", "--model", "unused", "--data", "unused"]])
def test_build_into_an_unwritable_root(capsys, tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _run(capsys, *command, "--root", str(blocker / "root"))
    assert code == 2 and f"{str(blocker)!r} is a file, not a folder" in err


# -- the committed model folder ---------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "manifest.json")), reason="assets/ not built")
def _ignored_by_git(paths):
    """The paths git ignores (caches a harness is still filling beside the committed files); none outside a checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", ASSETS, "check-ignore", *paths], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {os.path.abspath(os.path.join(ASSETS, line)) for line in out.stdout.splitlines()} if out.returncode in (0, 1) \
        else set()


def test_every_committed_store_carries_a_metadata_checksum_and_verifies():
    found = find_stores(ASSETS)
    ignored = _ignored_by_git(found)
    stores = [p for p in found if os.path.abspath(p) not in ignored]
    manifest = json.load(open(os.path.join(ASSETS, "manifest.json")))
    tracin = json.load(open(os.path.join(ASSETS, TRACIN_INDEX)))
    listed = {os.path.join(ASSETS, p) for p in manifest["stores"]} | {os.path.join(ASSETS, c["store"])
                                                                     for c in tracin["checkpoints"]}
    assert listed <= set(stores)
    for path in stores:
        store = FeatureStore.open(path)  # metadata_sha256, shapes, features_sha256
        assert store.complete and store.metadata["format_version"] == 2 and "metadata_sha256" in store.metadata


def test_a_replaced_tracin_checkpoint_passes_start_up_and_reaches_the_apps_banner(folder, monkeypatch):
    """Start-up checks TracInCP by its index only; the background full check hashes its weights,
    and the page's banner (`show_damage`) then names the replaced checkpoint and turns TracInCP off."""

    early, final = (os.path.join(folder, "tracin", "checkpoints", s, "unet", "diffusion_pytorch_model.safetensors")
                    for s in ("step-00003", "step-00006"))
    shutil.copyfile(early, final)
    monkeypatch.setenv("DTRAK_ASSETS", folder)
    app = load_app()
    try:
        assert "tracin" in app.assets().methods and not app.quick_damage(folder)
        banner = app.show_damage()
        assert banner.visible and "step-00006/unet" in banner.value and "hashes to" in banner.value
        assert "tracin" in app.full_check(folder) and "gas" in app.full_check(folder)
    finally:
        app.load_assets.cache_clear()
        app.full_check.cache_clear()
