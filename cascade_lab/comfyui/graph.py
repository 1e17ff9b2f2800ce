"""Checks of an API graph before any model loads: unknown nodes, broken links, wrong input types, missing
values and missing model or input files, all reported in one message. Then the order the nodes run in."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .nodes import ADVICE, NODES, Input
from .workflow import Graph, WorkflowError, _order, title

# model-file inputs: node → (input, ComfyUI folder kind)
MODEL_FILES: dict[str, tuple[str, str]] = {
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "unCLIPCheckpointLoader": ("ckpt_name", "checkpoints"),
    "UNETLoader": ("unet_name", "diffusion_models"),
    "CLIPLoader": ("clip_name", "text_encoders"),
    "VAELoader": ("vae_name", "vae"),
    "CLIPVisionLoader": ("clip_name", "clip_vision"),
    "LoraLoader": ("lora_name", "loras"),
    "LoraLoaderModelOnly": ("lora_name", "loras"),
    "ControlNetLoader": ("control_net_name", "controlnet"),
}


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) in (2, 3) and isinstance(value[1], int)


def output_nodes(graph: Graph) -> list[str]:
    return sorted((k for k, v in graph.items() if v["class_type"] in NODES and NODES[v["class_type"]].output),
                  key=_order)


def needed(graph: Graph) -> list[str]:
    """The nodes the output nodes depend on (ComfyUI runs nothing else), in an order where inputs come first."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node_id: str, path: tuple[str, ...]) -> None:
        if state.get(node_id) == 2 or node_id not in graph:
            return
        if state.get(node_id) == 1:
            raise WorkflowError("the workflow has a cycle: " + " → ".join(title(graph, n) for n in (*path, node_id)))
        state[node_id] = 1
        for value in graph[node_id]["inputs"].values():
            if is_link(value):
                visit(str(value[0]), (*path, node_id))
        state[node_id] = 2
        order.append(node_id)

    for node_id in output_nodes(graph):
        visit(node_id, ())
    return order


def check(graph: Graph, *, comfyui: str | os.PathLike[str] | None = None,
          extra_model_paths: Any = None, input_dir: str | os.PathLike[str] | None = None,
          given: Mapping[str, Any] | None = None) -> list[str]:
    """Raise `WorkflowError` naming every problem, or return the nodes to run in order. ``given`` names nodes
    whose outputs the caller supplies (they are not run, so their inputs and files are not checked)."""
    given = given or {}
    unknown = [n for n in sorted(graph, key=_order) if graph[n]["class_type"] not in NODES]
    if unknown:
        lines = [f"this workflow uses {len(unknown)} node type(s) cascade_lab does not run:"]
        for node_id in unknown:
            kind = graph[node_id]["class_type"]
            advice = ADVICE.get(kind, "a custom node: replace it by built-in nodes in ComfyUI, or give its outputs "
                                      f"with outputs={{'{node_id}': ...}}")
            lines.append(f"  node {title(graph, node_id)}: {advice}")
        lines.append(f"Supported: {', '.join(sorted(NODES))}. Nothing was loaded or written.")
        # an unknown node that is given (outputs=) is fine; others stop the run
        if any(n not in given for n in unknown):
            raise WorkflowError("\n".join(lines))
    if not output_nodes(graph):
        raise WorkflowError("the workflow has no SaveImage or PreviewImage node, so it has nothing to make; add one "
                            "after the VAEDecode")
    order = needed(graph)
    problems: list[str] = []
    for node_id in order:
        if node_id in given:
            continue
        node = graph[node_id]
        spec = NODES.get(node["class_type"])
        if spec is None:
            continue
        for inp in spec.inputs:
            value = node["inputs"].get(inp.name)
            where = f"node {title(graph, node_id)} input {inp.name!r}"
            if value is None:
                if not inp.optional and inp.default is None:
                    problems.append(f"{where}: missing (connect it, or check that the node feeding it is not muted)")
                continue
            if is_link(value):
                problems += _check_link(graph, where, inp, value)
            elif not inp.widget:
                problems.append(f"{where}: needs a connection from a {inp.type} output, got the value {value!r}")
            else:
                problems += _check_value(where, inp, value)
        problems += _check_files(graph, node_id, comfyui, extra_model_paths, input_dir)
    if problems:
        raise WorkflowError(f"the workflow cannot run ({len(problems)} problem(s)); nothing was loaded or written:\n  "
                            + "\n  ".join(problems))
    return order


def _check_link(graph: Graph, where: str, inp: Input, value: list[Any]) -> list[str]:
    source = str(value[0])
    if source == "?":  # the UI form names a link its links list does not hold, or one from a deleted node
        return [f"{where}: broken link (link {value[2]}) to no node of the workflow; reconnect it in ComfyUI"]
    if source not in graph:
        return [f"{where}: broken link, node {source} does not exist; reconnect it in ComfyUI"]
    spec = NODES.get(graph[source]["class_type"])
    if spec is None:
        return []
    slot = int(value[1])
    if not 0 <= slot < len(spec.outputs):
        return [f"{where}: broken link to output {slot} of node {title(graph, source)}, which has "
                f"{len(spec.outputs)} output(s)"]
    name, kind = spec.outputs[slot]
    if kind != inp.type:
        return [f"{where}: wrong input type, needs {inp.type} but gets {kind} (output {name!r} of node "
                f"{title(graph, source)})"]
    return []


def _check_value(where: str, inp: Input, value: Any) -> list[str]:
    ok = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and v.is_integer()),
          "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "STRING": lambda v: isinstance(v, str),
          "BOOLEAN": lambda v: isinstance(v, bool),
          "COMBO": lambda v: isinstance(v, str)}[inp.type]
    if not ok(value):
        return [f"{where}: wrong input type, needs {inp.type} but got {value!r}"]
    if inp.choices and value not in inp.choices:
        return [f"{where}: {value!r} is not one of {', '.join(inp.choices)}"]
    return []


def _check_files(graph: Graph, node_id: str, comfyui: Any, extra_model_paths: Any, input_dir: Any) -> list[str]:
    node = graph[node_id]
    kind = node["class_type"]
    if kind in MODEL_FILES:
        name = node["inputs"].get(MODEL_FILES[kind][0])
        if not isinstance(name, str):
            return []
        from ..weights import WeightsNotFoundError, comfyui_model_path

        try:
            comfyui_model_path(MODEL_FILES[kind][1], name, comfyui=comfyui, extra_model_paths=extra_model_paths)
        except WeightsNotFoundError as e:
            return [f"node {title(graph, node_id)}: " + str(e).replace("\n", "\n    ")]
    if kind in ("LoadImage", "LoadImageMask"):
        name = node["inputs"].get("image")
        if isinstance(name, str) and find_input(name, input_dir) is None:
            folder = Path(input_dir) if input_dir is not None else None
            where = f"looked in {folder / name}" if folder else "no input folder: pass input_dir= (or --input DIR)"
            return [f"node {title(graph, node_id)}: input image {name!r} not found ({where}); put it in ComfyUI's "
                    "input folder"]
    return []


def find_input(name: str, input_dir: str | os.PathLike[str] | None) -> Path | None:
    """A LoadImage file name (ComfyUI may append ' [input]' / ' [output]') in the input folder, or None."""
    if input_dir is None:
        return None
    clean = name.removesuffix(" [input]").removesuffix(" [output]").removesuffix(" [temp]")
    from ..weights.comfyui_paths import safe_model_name

    path = Path(input_dir) / safe_model_name(clean)
    return path if path.is_file() else None
