"""ruff (pyproject.toml [tool.ruff]: pyflakes, pycodestyle errors, import order) finds nothing."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.isfile(ruff):
        pytest.skip("ruff is not installed (pip install -r requirements-test.txt)")
    done = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
