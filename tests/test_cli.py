"""CLI smoke test on a tiny config: build, generate, attribute (seed and image), featurize, errors."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.build import build_default
from dtrak_core.cli import main
from dtrak_core.model.training import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("assets"))
    build_default(root, TrainConfig(steps=4, batch_size=16, block_out_channels=(4, 8)),
                  settings=(FeatureSetting("square", K=10, k=32), FeatureSetting("loss", K=10, k=32)), show_bar=False)
    return root


def test_generate_and_attribute(tiny_root, tmp_path, capsys):
    out = str(tmp_path / "s.png")
    assert main(["generate", "--root", tiny_root, "--seed", "3", "--steps", "5", "--out", out]) == 0
    assert Image.open(out).size == (64, 64)
    capsys.readouterr()
    assert main(["attribute", "--root", tiny_root, "--seed", "3", "--method", "trak", "--top", "4", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["method"] == "loss" and len(table["proponents"]) == 4 and len(table["opponents"]) == 4
    scores = [r["score"] for r in table["proponents"]]
    assert scores == sorted(scores, reverse=True)
    assert main(["attribute", "--root", tiny_root, "--image", out, "--top", "2"]) == 0
    assert "proponents" in capsys.readouterr().out


def test_featurize_new_store_and_errors(tiny_root, tmp_path, capsys):
    assert main(["featurize", "--root", tiny_root, "--output-fn", "l2-norm", "--K", "10", "--k", "32"]) == 0
    assert main(["attribute", "--root", tiny_root, "--seed", "1", "--method", "l2-norm", "--json"]) == 0
    capsys.readouterr()
    assert main(["attribute", "--root", tiny_root, "--seed", "1", "--method", "avg"]) == 2
    err = capsys.readouterr().err
    assert "no feature store for method 'avg'" in err
    assert f"`python -m dtrak_core featurize --root {tiny_root} --output-fn avg`" in err  # the hint runs as written
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    assert main(["attribute", "--root", tiny_root, "--image", str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["attribute", "--root", str(tmp_path), "--seed", "1"]) == 2


def test_counterfactual_under_torchrun_runs_each_ranks_jobs_then_summarizes(tiny_root, tmp_path, monkeypatch, capsys):
    """Each torchrun rank takes its own jobs (i, i+n, ...), as --shard does; the summary waits for all."""
    out = str(tmp_path / "cf")
    args = ["counterfactual", "--root", tiny_root, "--out", out, "--targets", "2", "--rankings", "random",
            "--k", "5", "--no-control", "--gallery", "0", "--threads", "1"]
    jobs = os.path.join(out, "jobs")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert main(args) == 0
        assert f"rank {rank}/2 done" in capsys.readouterr().out and not os.path.exists(os.path.join(out, "summary.json"))
        assert len([f for f in os.listdir(jobs) if f.endswith(".npz")]) == 2 - int(rank)
    monkeypatch.delenv("WORLD_SIZE")
    assert main([*args, "--summary-only"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [c["l2"]["n"] for c in summary["cells"]] == [2]


def test_das_is_unavailable_until_build_das_writes_its_training_losses(tiny_root, capsys):
    """No request computes DAS's training losses into the model folder (it used to, on the first DAS
    query); `build-das` is the one writer, and the error names it."""
    residuals = os.path.join(tiny_root, "das_residuals.npz")
    assert main(["featurize", "--root", tiny_root, "--output-fn", "avg", "--K", "10", "--k", "32"]) == 0
    capsys.readouterr()
    assert main(["attribute", "--root", tiny_root, "--seed", "1", "--method", "das"]) == 2
    err = capsys.readouterr().err
    assert f"build them with `python -m dtrak_core build-das --root {tiny_root}`" in err and "Traceback" not in err
    assert not os.path.exists(residuals)
    assert main(["build-das", "--root", tiny_root]) == 0
    assert f"wrote {residuals}" in capsys.readouterr().out and os.path.isfile(residuals)
    assert main(["build-das", "--root", tiny_root]) == 0
    assert "already built" in capsys.readouterr().out
    assert main(["attribute", "--root", tiny_root, "--seed", "1", "--method", "das", "--top", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["proponents"]) == 3
    with open(residuals, "r+b") as f:  # truncated: named, with the command that rebuilds it
        f.truncate(os.path.getsize(residuals) // 2)
    assert main(["attribute", "--root", tiny_root, "--seed", "1", "--method", "das"]) == 2
    err = capsys.readouterr().err
    assert f"error: {residuals} (DAS training losses) cannot be read" in err and "build-das" in err


def _python(code: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with this checkout importable (as after `pip install .`)."""
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_the_command_line_parses_before_importing_torch(tmp_path):
    """-h (top level and every command, text-to-image ones included) answers without importing torch,
    diffusers or transformers;
    the console script `dtrak` shows its own name."""
    code = textwrap.dedent("""
        import contextlib, io, sys
        from dtrak_core.cli import build_parser, main
        parser = build_parser()
        commands = [a for a in parser._subparsers._group_actions[0].choices]
        for argv in [["-h"]] + [[c, "-h"] for c in commands]:  # the text-to-image commands' too
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as e:
                    assert e.code == 0, argv
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "numpy") if m in sys.modules)
        print(len(commands), heavy)
        sys.argv[0] = "/usr/local/bin/dtrak"
        print(build_parser().prog, build_parser().format_usage().split()[1])
    """)
    done = _python(code, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    count, heavy = done.stdout.splitlines()[0].split(" ", 1)
    assert int(count) >= 20 and heavy == "[]"
    assert done.stdout.splitlines()[1] == "dtrak dtrak"
    usage = _python("import runpy, sys; sys.argv = ['dtrak_core', '-h']; runpy.run_module('dtrak_core', run_name='__main__')")
    assert usage.stdout.startswith("usage: python -m dtrak_core") and "lds-own" in usage.stdout


def test_setting_show_json_is_json_only(capsys):
    assert main(["setting", "show", "--config", "cifar2", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["name"] == "cifar2" and "lds" in config


def test_no_model_folder_names_dtrak_assets_and_root(tmp_path, monkeypatch, capsys):
    """From a folder with no ./assets (an installed package ships none): the CLI and the API say how
    to name a model folder."""
    from dtrak_core import Attributor

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DTRAK_ASSETS", raising=False)
    assert main(["attribute", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "DTRAK_ASSETS" in err and "--root" in err
    with pytest.raises(ValueError, match=r"no model folder was given.*root=.*DTRAK_ASSETS"):
        Attributor.load()
    monkeypatch.setenv("DTRAK_ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="DTRAK_ASSETS='.*nowhere' holds no model folder"):
        Attributor.load()


def test_a_text2image_command_without_its_extras_names_them(tmp_path):
    done = _python("import sys; sys.modules['transformers'] = sys.modules['peft'] = None\n"
                   "from dtrak_core.cli import main\n"
                   f"sys.exit(main(['build-text2image', '--root', {str(tmp_path / 't2i')!r}]))")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pip install .[text2image]" in done.stderr and "'transformers'" in done.stderr


def test_the_readme_lists_every_extra_and_what_to_set_for_the_api():
    readme = open(os.path.join(ROOT, "README.md")).read()
    api = readme[readme.index("## Python API"):readme.index("## Layout")]
    extras = re.findall(r"^(\w+) = \[", open(os.path.join(ROOT, "pyproject.toml")).read().split(
        "[project.optional-dependencies]")[1].split("\n[")[0], flags=re.M)
    assert sorted(extras) == ["app", "clip", "test", "text2image"]
    assert all(f"`pip install .[{e}]`" in api for e in extras)
    assert "DTRAK_ASSETS" in api and "root=" in api
