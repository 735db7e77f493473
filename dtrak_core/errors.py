"""The exceptions dtrak raises on purpose, in one place: callers catch these types, never match
message text. Each message says what went wrong and what to do."""
from __future__ import annotations

import os


class Cancelled(Exception):
    """Raised when a `should_stop` callback asks a long run (training, featurizing) to stop."""


class UnknownMethod(ValueError):
    """A method or output-function name the registry (`attribution.methods`) does not know."""


class MethodUnavailable(ValueError):
    """The method's inputs (weights, stores, seeds) are not present; the message says which."""


class UploadError(ValueError):
    """An upload that cannot be used; the message says why, for the person who sent it."""


class IntegrityError(ValueError):
    """A file on disk is unreadable, damaged, or disagrees with what was recorded about it.

    `path` is the file; the message names it, says what it is and what to do.
    """

    def __init__(self, path: str, problem: str, remedy: str):
        self.path = str(path)
        hint = restore_hint(path)
        super().__init__(f"{path} {problem}; {hint + ', or ' if hint else ''}{remedy}")


class SealMismatch(IntegrityError):
    """A sealed manifest entry (`folder.ModelFolder.settings_hash`) that no longer matches its seal:
    it was edited by hand. `entry` is the sealed entry ("train_config", "tuned_lambda/<key>")."""

    def __init__(self, path: str, entry: str, problem: str, remedy: str):
        self.entry = entry
        super().__init__(path, problem, remedy)


def restore_hint(path: str) -> str:
    """'restore the committed copy with `git checkout -- <file>`' for a file git tracks (the
    embedded default ships in the repository), else ''."""
    import subprocess

    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):  # a missing file's folder may be missing too
        folder = os.path.dirname(folder)
    try:
        top = subprocess.run(["git", "-C", folder, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0:
            return ""
        rel = os.path.relpath(os.path.abspath(path), top.stdout.strip())
        tracked = subprocess.run(["git", "-C", top.stdout.strip(), "ls-files", "--error-unmatch", rel],
                                 capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"restore the committed copy with `git checkout -- {rel}`" if tracked.returncode == 0 else ""
