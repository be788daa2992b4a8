"""Adaptive knowledge amalgamation (Shen et al., ICCV 2019), attribute experiment on CelebA.

Package layout, in the order data flows:
``attributes`` (registry) -> ``celeba`` / ``synthetic`` (data) -> ``models`` (ResNet-18,
feature taps) -> ``losses`` (entropy, bridges, penalty) -> ``methods`` (one module per
stage with ``forward_train``) -> ``engine`` (the one training loop) -> ``checkpoint``
(files, recipes, resume) -> ``config`` (presets, flags) -> ``runtime`` (logging, seeds,
loaders, the demo data) -> ``routing`` -> ``stages`` (what the scripts call) and
``evaluation``; ``cli`` turns user errors into one line.
"""
from __future__ import annotations

import re
from pathlib import Path


class KamalError(Exception):
    """An error caused by the user's input (files, flags); scripts print it as one line."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type if it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_failure(path: str | Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few words for an error line.

    In our words: torch's own text about weights_only goes on to suggest
    ``weights_only=False``, which would run the file's code."""
    if Path(path).stat().st_size == 0:
        return "the file is empty"
    text = str(error)
    pickled = re.search(r"GLOBAL ([A-Za-z_][\w.]*\.[A-Za-z_]\w*)", text)
    if pickled:
        return f"it holds pickled objects ({pickled.group(1)}), which weights_only refuses to load"
    about_weights_only = re.search(r"weights[ _]only", text, re.IGNORECASE)
    detail = "" if about_weights_only else f" ({type(error).__name__}: {first_line(error)})"
    return f"torch cannot read it safely: another format, damaged or cut short{detail}"
