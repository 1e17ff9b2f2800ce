"""Plain-text listings shared by the command line and the ``%cascade`` line magic."""

from __future__ import annotations

from typing import Any

from .plugins import plugin_infos, registries


def plugins_text() -> str:
    """Each plugin: name, source and version, hooks, registered names, load errors."""
    lines = []
    for info in plugin_infos():
        version = f" {info.version}" if info.version else ""
        lines.append(f"{info.name} ({info.source}{version})")
        lines.append(f"  hooks: {', '.join(info.hooks) or '-'}")
        for kind, names in sorted(info.registered.items()):
            lines.append(f"  {kind}s: {', '.join(names)}")
        for error in info.errors:
            lines.append(f"  ERROR: {error}")
    return "\n".join(lines)


def kind_text(kind: str) -> str:
    """The registered samplers, schedulers or variants, one line each with the plugin that provides it; samplers
    and schedulers grouped by family, with their convention (logSNR: the official GDF one, σ: ComfyUI's)."""
    registry = registries()[kind]
    if not len(registry):
        return f"(no {kind}s registered)"
    width = max(len(n) for n in registry.names())
    if kind not in ("sampler", "scheduler"):
        return "\n".join(
            f"{item.name:<{width}}  {item.description}  [{registry.owner[item.name]}]" for item in registry
        )
    families: dict[str, list[Any]] = {}
    for item in registry:
        families.setdefault(item.family or "other", []).append(item)
    order = sorted(families, key=lambda f: ({"official": 0, "comfyui": 1}.get(f, 2), f))
    lines = []
    for family in order:
        items = families[family]
        space = {"logsnr": "logSNR levels", "sigma": "σ levels"}[items[0].space] \
            if len({i.space for i in items}) == 1 else "mixed"
        lines.append(f"{family} ({len(items)} {kind}s, {space}):")
        lines += [f"  {item.name:<{width}}  {item.description}  [{registry.owner[item.name]}]" for item in items]
    if any(n.startswith("comfyui.") for n in registry.names()):
        lines.append(f"comfyui.NAME: ComfyUI's {kind} where the official family has the same name; with "
                     "--compat comfyui (compat='comfyui') the plain NAME means ComfyUI's (docs/comfyui.md).")
    return "\n".join(lines)
