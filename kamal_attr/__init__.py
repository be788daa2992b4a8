"""Adaptive knowledge amalgamation (Shen et al., ICCV 2019), attribute experiment on CelebA.

Package layout, in the order data flows:
``attributes`` (registry) -> ``celeba`` / ``synthetic`` (data) -> ``models`` (ResNet-18,
feature taps) -> ``losses`` (entropy, bridges, penalty) -> ``methods`` (one module per
stage with ``forward_train``) -> ``engine`` (the one training loop) -> ``checkpoint``
(files, recipes, resume) -> ``config`` (presets, flags) -> ``runtime`` (logging, seeds,
loaders, the demo data) -> ``routing`` -> ``stages`` (what the scripts call) and
``evaluation``; ``cli`` turns user errors into one line.
"""


class KamalError(Exception):
    """An error caused by the user's input (files, flags); scripts print it as one line."""
