"""The σ family: ComfyUI's sampler set (k-diffusion and its descendants) as small functions, see `common`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def __getattr__(name: str) -> Any:
    """``sample_<name>`` from whichever module of this package defines it (modules load on first use)."""
    if name.startswith("sample_"):
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
