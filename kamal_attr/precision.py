"""Where bf16 autocast must not reach: a region computed in float32 inside it."""
from __future__ import annotations

import contextlib

import torch


def float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` inside the ``with``, where it is on; else nothing.

    ``torch.autocast(..., enabled=False)`` itself raises on a device without autocast (a
    ``meta`` probe; MPS in older torch), so it is entered only where autocast is running.
    """
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
