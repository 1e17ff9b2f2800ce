"""A ComfyUI workflow in any of its three forms → ComfyUI's API graph ``{id: {"class_type", "inputs", "_meta"}}``.

The forms: the API prompt (what ComfyUI's queue receives), the UI workflow (``nodes`` + ``links`` +
``widgets_values``, what the editor saves) and a PNG carrying either in its ``prompt`` / ``workflow`` text chunks
(``prompt`` preferred). The UI form is turned into the API graph as ComfyUI's frontend does before queueing: muted
nodes (mode 2) are left out, bypassed ones (mode 4) pass their input of the matching type through, Reroute nodes
are followed, a PrimitiveNode's value becomes the widget value it drives, notes are dropped. No torch here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .nodes import NODES, widget_names

Graph = dict[str, dict[str, Any]]  # ComfyUI's API prompt
MUTED, BYPASSED = 2, 4  # LiteGraph node modes: "never" and ComfyUI's bypass
VIRTUAL = ("Reroute", "PrimitiveNode", "Note", "MarkdownNote")  # frontend-only nodes, never sent to the executor


class WorkflowError(ValueError):
    """A workflow that cannot run; the message names every problem found and what to do."""


def read_workflow(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Graph, dict[str, Any] | None]:
    """(API graph, UI workflow or None) from a ``.json`` file (either form), a ComfyUI PNG or a loaded dict."""
    ui: dict[str, Any] | None = None
    if isinstance(source, Mapping):
        data: Any = dict(source)
        where = "the workflow"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise WorkflowError(f"workflow file {where!r} does not exist; pass a ComfyUI .json (UI or API form) or a "
                                "PNG saved by ComfyUI")
        if path.suffix.lower() == ".png" or path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n":
            return read_png(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise WorkflowError(f"{where}: not valid JSON ({e}); export the workflow from ComfyUI with Save or "
                                "Export (API)") from None
    if not isinstance(data, Mapping):
        raise WorkflowError(f"{where}: expected a JSON object, got a {type(data).__name__}")
    if "nodes" in data and "links" in data:
        ui = dict(data)
        return ui_to_api(ui), ui
    if "prompt" in data and isinstance(data["prompt"], Mapping) and _is_api(data["prompt"]):
        return _api(data["prompt"], where), data.get("extra_data", {}).get("extra_pnginfo", {}).get("workflow")
    if _is_api(data):
        return _api(data, where), None
    raise WorkflowError(f"{where}: neither ComfyUI's UI form (\"nodes\" and \"links\") nor its API form "
                        "({\"<id>\": {\"class_type\": ..., \"inputs\": {...}}})")


def read_png(path: str | os.PathLike[str]) -> tuple[Graph, dict[str, Any] | None]:
    """The graph a ComfyUI PNG carries: its ``prompt`` chunk (API form), else its ``workflow`` chunk (UI form)."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    ui = None
    if "workflow" in text:
        try:
            ui = json.loads(text["workflow"])
        except json.JSONDecodeError:
            ui = None
    if "prompt" in text:
        try:
            prompt = json.loads(text["prompt"])
        except json.JSONDecodeError as e:
            prompt = None
            if ui is None:
                raise WorkflowError(f"{path}: its 'prompt' text chunk is not valid JSON ({e})") from None
        if isinstance(prompt, Mapping) and _is_api(prompt):
            return _api(prompt, str(path)), ui
    if isinstance(ui, Mapping) and "nodes" in ui:
        return ui_to_api(ui), dict(ui)
    raise WorkflowError(f"{path}: no ComfyUI workflow in this PNG (no 'prompt' or 'workflow' text chunk); only PNGs "
                        "saved by ComfyUI's SaveImage carry one")


def _is_api(data: Mapping[str, Any]) -> bool:
    return bool(data) and all(isinstance(v, Mapping) and "class_type" in v for v in data.values())


def _api(data: Mapping[str, Any], where: str) -> Graph:
    graph: Graph = {}
    for node_id, node in data.items():
        inputs = node.get("inputs", {})
        if not isinstance(inputs, Mapping):
            raise WorkflowError(f"{where}: node {node_id} ({node['class_type']}) has inputs {inputs!r}, not an object")
        graph[str(node_id)] = {"class_type": str(node["class_type"]), "inputs": dict(inputs),
                               "_meta": dict(node.get("_meta", {}))}
    return graph


# -- the UI form --------------------------------------------------------------------------------------------
Link = tuple[str, int, str, int, str]  # (origin node, origin slot, target node, target slot, type)


def _links(ui: Mapping[str, Any]) -> dict[str, Link]:
    """link id → (origin node, origin slot, target node, target slot, type); list rows or objects."""
    out = {}
    for link in ui.get("links") or []:
        if isinstance(link, Mapping):
            row = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                   link.get("type", "*"))
        else:
            row = tuple(link[:6])
        out[str(row[0])] = (str(row[1]), int(row[2]), str(row[3]), int(row[4]), str(row[5]))
    return out


def ui_to_api(ui: Mapping[str, Any]) -> Graph:
    """ComfyUI's UI workflow → its API graph, as the frontend builds the prompt it queues."""
    nodes = {str(n["id"]): n for n in ui.get("nodes", [])}
    links = _links(ui)
    extra = ui.get("extra")
    groups = extra.get("groupNodes") if isinstance(extra, Mapping) else None
    if groups:
        from .groups import expand_group_nodes

        nodes, links = expand_group_nodes(nodes, links, groups)

    def source(link_id: str, want: str, seen: frozenset[str] = frozenset()) -> Any:
        """[origin id, slot] for a link, through reroutes and bypassed nodes; a primitive's value; None if muted."""
        if link_id not in links:
            return ("broken", link_id)
        origin, slot, _, _, kind = links[link_id]
        node = nodes.get(origin)
        if node is None:
            return ("broken", link_id)
        if origin in seen:
            return ("broken", link_id)
        if node.get("type") == "Reroute":
            upstream = [i.get("link") for i in node.get("inputs", []) if i.get("link") is not None]
            return source(str(upstream[0]), want, seen | {origin}) if upstream else None
        if node.get("type") == "PrimitiveNode":
            values = node.get("widgets_values") or [None]
            return ("value", values[0])
        mode = node.get("mode", 0)
        if mode == MUTED:
            return None
        if mode == BYPASSED:  # an input of the output's type passes through (the same slot index first)
            outputs = node.get("outputs") or []
            out_type = outputs[slot].get("type") if slot < len(outputs) else kind
            candidates = [(i, inp) for i, inp in enumerate(node.get("inputs") or []) if inp.get("link") is not None
                          and inp.get("type") == out_type]
            candidates.sort(key=lambda c: c[0] != slot)
            return source(str(candidates[0][1]["link"]), want, seen | {origin}) if candidates else None
        return [origin, slot]

    graph: Graph = {}
    for node_id, node in sorted(nodes.items(), key=lambda item: _order(item[0])):
        kind = node.get("type", "")
        if kind in VIRTUAL or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if isinstance(values, Mapping):
            inputs.update(values)
        elif isinstance(values, list) and kind in NODES:
            for widget, value in zip(widget_names(kind), values, strict=False):
                if widget is not None:
                    inputs[widget] = value
        for inp in node.get("inputs") or []:
            name = inp.get("name")
            if inp.get("widget") and inp.get("link") is None:
                continue  # a widget shown as a socket, not connected: its widgets_values entry holds the value
            if inp.get("link") is None:
                continue
            got = source(str(inp["link"]), inp.get("type", "*"))
            if got is None:
                inputs.pop(name, None)  # fed by a muted node: ComfyUI sends nothing (a required one then fails)
            elif isinstance(got, tuple) and got[0] == "value":
                inputs[name] = got[1]
            elif isinstance(got, tuple):
                link = int(got[1]) if str(got[1]).isdigit() else got[1]
                inputs[name] = ["?", -1, link]  # a link to no node of the workflow: reported by the checks
            else:
                inputs[name] = got
        meta = {"title": node["title"]} if node.get("title") else {}
        graph[node_id] = {"class_type": kind, "inputs": inputs, "_meta": meta}
    return graph


def apply_settings(graph: Graph, settings: Mapping[str, Any]) -> Graph:
    """A copy with ``{"NODE.INPUT": value}`` set (``--set 3.seed=5``); a node or input the graph lacks is an error."""
    out = {k: {**v, "inputs": dict(v["inputs"])} for k, v in graph.items()}
    problems = []
    for key, value in settings.items():
        node_id, _, name = str(key).partition(".")
        if not name:
            problems.append(f"{key!r}: write NODE.INPUT, e.g. 3.seed")
            continue
        node = out.get(node_id)
        if node is None:
            nodes = ", ".join(sorted(out, key=_order))
            problems.append(f"{key!r}: the workflow has no node {node_id} (nodes: {nodes})")
            continue
        spec = NODES.get(node["class_type"])
        known = set(node["inputs"]) | ({i.name for i in spec.inputs} if spec else set())
        if name not in known:
            problems.append(f"{key!r}: node {node_id} ({node['class_type']}) has no input {name!r}; it has "
                            f"{', '.join(sorted(known))}")
            continue
        node["inputs"][name] = value
    if problems:
        raise WorkflowError("cannot apply the settings:\n  " + "\n  ".join(problems))
    return out


def parse_setting(text: str) -> tuple[str, Any]:
    """``"3.seed=5"`` → ("3.seed", 5): the value read as JSON when it parses (numbers, true/false), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise WorkflowError(f"--set {text!r}: write NODE.INPUT=VALUE, e.g. --set 3.seed=5 or --set 6.text='a fox'")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def title(graph: Graph, node_id: str) -> str:
    """'3 KSampler' or '6 CLIPTextEncode "CLIP Text Encode (Positive Prompt)"' for messages."""
    node = graph[node_id]
    name = node.get("_meta", {}).get("title")
    return f"{node_id} {node['class_type']}" + (f" \"{name}\"" if name and name != node["class_type"] else "")
