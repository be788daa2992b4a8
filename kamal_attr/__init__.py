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

from pathlib import Path


class KamalError(Exception):
    """An error caused by the user's input (files, flags); scripts print it as one line."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type if it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_failure(path: str | Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few words for an error line."""
    if Path(path).stat().st_size == 0:
        return "the file is empty"
    text = str(error)
    if "weights_only" not in text.replace("Weights only", "weights_only"):
        return first_line(error)
    # torch's own text goes on to suggest weights_only=False, which would run the file's code
    if "Unsupported global" in text:
        return "it holds objects other than tensors and plain values, which weights_only refuses"
    return "not a file written by torch.save: another format, a web page, zeroed or cut short"
