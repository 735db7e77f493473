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


class InputImagesError(ValueError):
    """Images given to a featurizer or a feature store (a tensor, a sequence or Dataset of items, an
    iterable of batches) that cannot be used; the message says which item and what was expected.
    `where`: "item <i>", "batch <j> (from item <i>)", or None (the images as a whole)."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(message)


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


def root_option(root) -> str:
    """' --root <root>' for a command named in a hint, so that the hint runs as written; '' for the
    built-in default (./assets with no $DTRAK_ASSETS), which every command finds by itself."""
    import shlex

    if root is None:
        return ""
    if not os.environ.get("DTRAK_ASSETS") and os.path.abspath(root) == os.path.abspath("assets"):
        return ""
    return f" --root {shlex.quote(str(root))}"


def no_model_folder(root: str, given_as: str = "--root") -> str:
    """Why no model folder is at the default place, and the two ways to name one: `given_as` (the
    CLI's --root, the API's root=) or the DTRAK_ASSETS environment variable."""
    env = os.environ.get("DTRAK_ASSETS")
    where = (f"DTRAK_ASSETS={env!r} holds no model folder (no manifest.json)" if env else
             f"no model folder was given and the default, {os.path.abspath(root)!r} ('assets' in the working "
             f"folder), has none (no manifest.json)")
    return (f"{where}; name a model folder (one built with `python -m dtrak_core build-default` or `build`) with "
            f"{given_as}, or set DTRAK_ASSETS to it (e.g. DTRAK_ASSETS=path/to/dtrak/assets, a clone's embedded "
            f"default; the installed package ships no model folder)")
