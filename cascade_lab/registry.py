"""Typed records of what plugins register, and a name-keyed registry per kind."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

SPACES = ("logsnr", "sigma")


@dataclass(frozen=True)
class Sampler:
    """A sampler: ``fn(denoiser, x, levels, *, noise=None, callback=None, cancel=None, **extras)``.

    ``space`` says which convention ``fn`` follows: ``"logsnr"`` (the official GDF family: VP latents, logSNR
    levels, returns the last x0; see `cascade_lab.diffusion`) or ``"sigma"`` (ComfyUI's / k-diffusion's family:
    VE latents, σ levels, returns the final x; see `cascade_lab.diffusion.ksamplers.common`). The pipeline
    converts latents and levels between the two, so any sampler runs with any scheduler. ``family`` groups
    the listing (``official``, ``comfyui`` or the plugin's own word).
    """

    name: str
    description: str
    fn: Callable[..., Any]
    space: str = "logsnr"
    family: str = ""
    drop_penultimate: bool = False  # ComfyUI's rule for dpm_2 / uni_pc: schedule steps + 1, drop the penultimate

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"Sampler {self.name!r}: space={self.space!r}; use one of {SPACES}")


@dataclass(frozen=True)
class Scheduler:
    """A scheduler: ``fn(steps, shift=1.0, t_start=1.0, t_end=0.0)`` -> ``steps + 1`` noise levels.

    ``space="logsnr"``: increasing logSNR levels (the official family); ``"sigma"``: decreasing σ, usually
    ending at 0 (ComfyUI's family, which takes partial schedules through ``denoise`` instead of t_start).
    """

    name: str
    description: str
    fn: Callable[..., Any]
    space: str = "logsnr"
    family: str = ""

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"Scheduler {self.name!r}: space={self.space!r}; use one of {SPACES}")


@dataclass(frozen=True)
class VariantFile:
    """One file of a variant: where it lives on the Hub and what it holds."""

    filename: str
    repo_id: str = "stabilityai/stable-cascade"
    subfolder: str = ""
    dtype: str = "float32"  # storage dtype of the file
    params: int = 0  # values stored (parameters and buffers)

    @property
    def nbytes(self) -> int:
        return self.params * (2 if self.dtype in ("bfloat16", "float16") else 4)


@dataclass(frozen=True)
class Variant:
    """A weight variant: which file each stage loads, with sizes for memory estimates.

    ``files`` maps a component (``stage_c``, ``stage_b``, ``stage_a``, ``effnet``, ``previewer``,
    ``text_encoder``, ``image_encoder``) to its file. ``stage_c`` / ``stage_b`` name the config presets.
    ``presets`` names the config preset of any other component whose file is not the official size.
    ``build`` (optional) makes the models without any file, as the ``tiny`` test variant does.
    """

    name: str
    description: str
    files: Mapping[str, VariantFile] = field(default_factory=dict)
    stage_c: str = "full"
    stage_b: str = "full"
    build: Callable[..., Any] | None = None
    presets: Mapping[str, str] = field(default_factory=dict)

    def preset(self, component: str) -> str | None:
        """The config preset a component's file was saved with (None: detect it from the file)."""
        return {"stage_c": self.stage_c, "stage_b": self.stage_b, **self.presets}.get(component)

    @property
    def file_bytes(self) -> int:
        return sum(f.nbytes for f in self.files.values())

    def memory_bytes(self, compute_bytes_per_value: int | None = None) -> int:
        """Weights of the two diffusion stages at their storage dtype (or the given width), plus the rest."""
        total = 0
        for name, f in self.files.items():
            width = compute_bytes_per_value if compute_bytes_per_value and name in ("stage_c", "stage_b") else None
            total += f.params * width if width else f.nbytes
        return total


T = TypeVar("T", Sampler, Scheduler, Variant)


class UnknownNameError(KeyError):
    """A name that no plugin registered; the message lists the available names."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Name → record, with the plugin that registered each name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self.owner: dict[str, str] = {}

    def add(self, item: T, plugin: str) -> None:
        if item.name in self._items:
            raise ValueError(
                f"{self.kind} {item.name!r} from plugin {plugin!r} is already registered by plugin "
                f"{self.owner[item.name]!r}; rename it or disable one of the two plugins"
            )
        self._items[item.name] = item
        self.owner[item.name] = plugin

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._items)


class LazyCallable:
    """``"package.module:function"`` imported on first call, so registering costs no heavy import."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._fn: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        if self._fn is None:
            import importlib

            module, _, attr = self.target.partition(":")
            self._fn = getattr(importlib.import_module(module), attr)
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<lazy {self.target}>"
