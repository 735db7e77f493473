"""The page's prose, style and scripts, kept as files beside this module (`texts/`), read once.

    texts.get("about.md")       # the About tab's text
"""
from __future__ import annotations

import os
import re
from functools import lru_cache

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "texts")


@lru_cache(maxsize=None)
def get(name: str) -> str:
    """The text of `texts/<name>`, without its final newline."""
    with open(os.path.join(FOLDER, name), encoding="utf-8") as f:
        return f.read().rstrip("\n")


def fill(text: str, **values) -> str:
    """`text` with each `{{name}}` replaced by values[name] (a number with thousands separators);
    plain braces (LaTeX) are left alone. A placeholder without a value is a ValueError."""
    def one(m):
        if m.group(1) not in values:
            raise ValueError(f"no value for the placeholder {m.group(0)}")
        v = values[m.group(1)]
        return f"{v:,}" if isinstance(v, int) else str(v)
    return re.sub(r"\{\{(\w+)\}\}", one, text)


def words(digits: bool, items: str = "images") -> dict:
    """The values of the placeholders by which the texts speak of the data (how_to_read.md,
    noise_help.md, benchmarks_help.md): the digits' own words on the digits, generic ones and a
    folder's kind of image (`items`: "images", "clothing images") elsewhere."""
    if digits:
        return dict(item="digit", items="digits", unlike="drawn differently", detail="strokes")
    return dict(item="image", items=items, unlike="different in its details", detail="fine detail")
