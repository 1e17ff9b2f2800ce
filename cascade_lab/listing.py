"""Plain-text listings shared by the command line and the ``%cascade`` line magic."""

from __future__ import annotations

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
    """One line per registered sampler, scheduler or variant, with the plugin that provides it."""
    registry = registries()[kind]
    if not len(registry):
        return f"(no {kind}s registered)"
    width = max(len(n) for n in registry.names())
    return "\n".join(
        f"{item.name:<{width}}  {item.description}  [{registry.owner[item.name]}]" for item in registry
    )
