"""The page's prose, style and scripts, kept as files beside this module (`texts/`), read once.

    texts.get("about.md")       # the About tab's text
"""
from __future__ import annotations

import os
from functools import lru_cache

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "texts")


@lru_cache(maxsize=None)
def get(name: str) -> str:
    """The text of `texts/<name>`, without its final newline."""
    with open(os.path.join(FOLDER, name), encoding="utf-8") as f:
        return f.read().rstrip("\n")
