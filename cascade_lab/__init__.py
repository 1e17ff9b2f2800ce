"""cascade_lab: run, inspect and fine-tune Stable Cascade from Jupyter.

Importing this package is cheap: it never imports torch or transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .api import Cascade, generate  # noqa: E402  (api imports no torch at module level)
from .hookspecs import hookimpl  # noqa: E402
from .params import GenerationParams, read_png_params  # noqa: E402
from .registry import Sampler, Scheduler, UnknownNameError, Variant, VariantFile  # noqa: E402


def train(*args: Any, **kwargs: Any) -> Any:
    """Fine-tune Stage C (LoRA or full); see `cascade_lab.training.TrainConfig` for every setting."""
    from .training import train as _train

    return _train(*args, **kwargs)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object defined in a notebook cell; returns the name it is known by."""
    from .plugins import register_plugin as _register

    return _register(plugin, name)


def unregister_plugin(plugin: object | str) -> None:
    """Remove a plugin registered with `register_plugin`."""
    from .plugins import unregister_plugin as _unregister

    _unregister(plugin)


_NOISE = ("NoiseSource", "OfficialNoise", "ComfyNoise", "RecordedNoise")


def __getattr__(name: str) -> Any:
    """The noise sources (`cascade_lab.diffusion.noise`), imported with torch on first use only."""
    if name in _NOISE:
        from .diffusion import noise

        return getattr(noise, name)
    raise AttributeError(f"module 'cascade_lab' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext cascade_lab``: register the ``%cascade`` / ``%%cascade`` magics."""
    from .notebook.magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext cascade_lab``: remove the magics again."""
    from .notebook.magics import unload_ipython_extension as _unload

    _unload(ipython)


__all__ = [
    "Cascade",
    "ComfyNoise",
    "GenerationParams",
    "NoiseSource",
    "OfficialNoise",
    "RecordedNoise",
    "Sampler",
    "Scheduler",
    "UnknownNameError",
    "Variant",
    "VariantFile",
    "__version__",
    "generate",
    "hookimpl",
    "load_ipython_extension",
    "read_png_params",
    "register_plugin",
    "train",
    "unload_ipython_extension",
    "unregister_plugin",
]
