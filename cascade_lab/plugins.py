"""The plugin manager: built-ins, ``cascade_lab`` entry points, notebook plugins, and the registries."""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import __version__, hookspecs
from .registry import Registry, Sampler, Scheduler, UnknownNameError, Variant

DEFAULT_PLUGINS = (
    "cascade_lab.builtins.samplers",
    "cascade_lab.builtins.schedulers",
    "cascade_lab.builtins.variants",
    "cascade_lab.builtins.comfyui",
)
COMPATS = ("official", "comfyui")
Record = Sampler | Scheduler | Variant
HOOKS: dict[str, tuple[str, type[Record]]] = {
    "register_samplers": ("sampler", Sampler),
    "register_schedulers": ("scheduler", Scheduler),
    "register_variants": ("variant", Variant),
}


class PluginWarning(UserWarning):
    """A plugin failed to load or register; it was skipped."""


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin", "entry point" or "notebook"
    version: str = ""
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


pm = pluggy.PluginManager("cascade_lab")
pm.add_hookspecs(hookspecs)
_infos: dict[str, PluginInfo] = {}
_registries: dict[str, Registry[Any]] | None = None
_loaded = False


_warned: set[tuple[str, str]] = set()  # (plugin, message) already shown: once per session, not at every rebuild


def _fail(info: PluginInfo, message: str) -> None:
    info.errors.append(message)
    if (info.name, message) in _warned:
        return
    _warned.add((info.name, message))
    warnings.warn(f"cascade_lab plugin {info.name!r}: {message}; skipped", PluginWarning, stacklevel=3)


def load_plugins() -> None:
    """Register the built-ins and the allowed entry points once; a broken plugin is recorded, never raised."""
    global _loaded, _registries
    if _loaded:
        return
    _loaded = True
    for module in DEFAULT_PLUGINS:
        if pm.get_plugin(module) is None:
            pm.register(importlib.import_module(module), name=module)
            _infos[module] = PluginInfo(module, "builtin", __version__)
    allow = os.environ.get("CASCADE_LAB_LOAD_PLUGINS")
    allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
    for ep in entry_points(group="cascade_lab"):
        if (allowed is not None and ep.name not in allowed) or pm.get_plugin(ep.name) is not None:
            continue
        version = ep.dist.version if ep.dist is not None else ""
        info = _infos[ep.name] = PluginInfo(ep.name, "entry point", version)
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken plugin must never break import or %load_ext
            _fail(info, f"failed to load ({type(exc).__name__}: {exc})")
    _registries = None


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (a class, instance or module defined in a notebook cell)."""
    load_plugins()
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    if pm.get_plugin(name) is not None:
        unregister_plugin(name)
    pm.register(plugin, name=name)
    _infos[name] = PluginInfo(name, "notebook")
    _invalidate()
    return name


def unregister_plugin(plugin: object | str) -> None:
    """Remove a plugin registered with `register_plugin` (by object or by name)."""
    name = plugin if isinstance(plugin, str) else pm.get_name(plugin)
    if name is None or pm.get_plugin(name) is None:
        raise ValueError(f"no plugin {plugin!r} is registered; see `cascade-lab plugins`")
    pm.unregister(name=name)
    _infos.pop(name, None)
    _invalidate()


def _invalidate() -> None:
    global _registries
    _registries = None


def registries() -> dict[str, Registry[Any]]:
    """Build (once) the sampler, scheduler and variant registries by calling every plugin's hooks."""
    global _registries
    load_plugins()
    if _registries is not None:
        return _registries
    regs: dict[str, Registry[Any]] = {kind: Registry(kind) for kind, _ in HOOKS.values()}
    for info in _infos.values():
        info.hooks, info.registered = [], {}
    for hook_name, (kind, record_type) in HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = _infos.setdefault(impl.plugin_name, PluginInfo(impl.plugin_name, "unknown"))
            info.hooks.append(hook_name)

            def register(item: Any, _info: PluginInfo = info, _kind: str = kind, _type: type[Record] = record_type,
                         _hook: str = hook_name) -> None:
                if not isinstance(item, _type):
                    raise TypeError(f"register() in {_hook} takes a cascade_lab.{_type.__name__}, "
                                    f"got {type(item).__name__}")
                try:
                    regs[_kind].add(item, _info.name)
                except ValueError as exc:  # duplicate name: keep the first, report the second
                    _fail(_info, str(exc))
                    return
                _info.registered.setdefault(_kind, []).append(item.name)

            try:
                impl.function(register=register)
            except Exception as exc:
                _fail(info, f"{hook_name} raised {type(exc).__name__}: {exc}")
    _registries = regs
    return regs


def _resolve(kind: str, name: str, compat: str) -> Any:
    """A name in the given compat mode: with ``compat="comfyui"`` ComfyUI's own name finds ComfyUI's record
    (registered as ``comfyui.<name>`` where the official family has the same name)."""
    if compat not in COMPATS:
        raise ValueError(f"compat={compat!r}: use one of {', '.join(COMPATS)}")
    registry = registries()[kind]
    if compat == "comfyui" and f"comfyui.{name}" in registry:
        return registry.get(f"comfyui.{name}")
    if compat == "comfyui" and name not in registry:
        comfy = sorted(r.name.removeprefix("comfyui.") for r in registry if getattr(r, "family", "") == "comfyui")
        others = sorted(r.name for r in registry if getattr(r, "family", "") != "comfyui")
        raise UnknownNameError(f"unknown {kind} {name!r}; available under compat='comfyui': ComfyUI's "
                               f"{', '.join(comfy)}; others: {', '.join(others)}")
    return registry.get(name)


def get_sampler(name: str, compat: str = "official") -> Sampler:
    """The sampler registered as ``name`` (with ``compat="comfyui"``, ComfyUI's sampler of that name)."""
    return _resolve("sampler", name, compat)  # type: ignore[no-any-return]


def get_scheduler(name: str, compat: str = "official") -> Scheduler:
    """The scheduler registered as ``name`` (with ``compat="comfyui"``, ComfyUI's scheduler of that name)."""
    return _resolve("scheduler", name, compat)  # type: ignore[no-any-return]


def get_variant(name: str) -> Variant:
    return registries()["variant"].get(name)  # type: ignore[no-any-return]


def plugin_infos() -> list[PluginInfo]:
    """Every known plugin with its version, hooks, registered names and errors."""
    registries()
    return list(_infos.values())
