"""Group nodes of ComfyUI's UI form (``extra.groupNodes``; an instance's type is ``workflow/NAME``) expanded into
their inner nodes, as the frontend does before it queues a prompt.

A definition lists its inner nodes in order (``index``) and its links as rows ``[origin index or None, origin
slot, target index, target slot, ..., type]`` (None: from outside the group). The instance's inputs are the inner
inputs not fed from inside, in inner-node order; its outputs the inner outputs that feed nothing inside or are
listed in ``external``; its ``widgets_values`` the inner nodes' widget values one after the other. Inner nodes
get the ids ``<instance id>:<index>`` and keep the instance's mode (muted or bypassed with it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .nodes import NODES, widget_names
from .workflow import Link, WorkflowError

GROUP_PREFIXES = ("workflow/", "workflow>")


def expand_group_nodes(nodes: dict[str, Any], links: dict[str, Link],
                       groups: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Link]]:
    """``(nodes, links)`` with every group node instance replaced by its inner nodes and links."""
    nodes, links = dict(nodes), dict(links)
    for node_id, node in list(nodes.items()):
        kind = str(node.get("type", ""))
        if not kind.startswith(GROUP_PREFIXES):
            continue
        name = kind[len("workflow/"):]
        if name not in groups:
            raise WorkflowError(f"node {node_id} is the group node {name!r}, which the workflow does not define "
                                "(extra.groupNodes); open it in ComfyUI and save it again")
        _expand(node_id, node, groups[name], nodes, links)
    return nodes, links


def _expand(group_id: str, instance: Mapping[str, Any], definition: Mapping[str, Any], nodes: dict[str, Any],
            links: dict[str, Link]) -> None:
    inner = sorted(definition.get("nodes", []), key=lambda n: n.get("index", 0))
    ids = {int(n.get("index", i)): f"{group_id}:{n.get('index', i)}" for i, n in enumerate(inner)}
    new: dict[str, Any] = {}
    for i, template in enumerate(inner):
        node = copy.deepcopy(dict(template))
        node["id"] = ids[int(template.get("index", i))]
        node["mode"] = instance.get("mode", 0)
        for inp in node.get("inputs") or []:
            inp["link"] = None
        new[node["id"]] = node
    # links inside the group
    fed: set[tuple[int, int]] = set()
    feeding: set[tuple[int, int]] = set()
    for k, row in enumerate(definition.get("links", [])):
        origin, origin_slot, target, target_slot = row[0], int(row[1]), int(row[2]), int(row[3])
        kind = str(row[-1])
        if origin is None:
            continue
        link_id = f"{group_id}:l{k}"
        links[link_id] = (ids[int(origin)], origin_slot, ids[target], target_slot, kind)
        new[ids[target]]["inputs"][target_slot]["link"] = link_id
        fed.add((target, target_slot))
        feeding.add((int(origin), origin_slot))
    external = {(int(e[0].get("index", -1)) if isinstance(e[0], Mapping) else int(e[0]), int(e[1]))
                for e in definition.get("external", [])}
    # the instance's inputs → the inner inputs not fed from inside, in order
    open_inputs = [(int(t.get("index", i)), j) for i, t in enumerate(inner)
                   for j, _ in enumerate(t.get("inputs") or []) if (int(t.get("index", i)), j) not in fed]
    for (index, slot), outer in zip(open_inputs, instance.get("inputs") or [], strict=False):
        link_id = outer.get("link")
        if link_id is None:
            continue
        origin, origin_slot, _, _, kind = links[str(link_id)]
        links[str(link_id)] = (origin, origin_slot, ids[index], slot, kind)
        new[ids[index]]["inputs"][slot]["link"] = link_id
    # the instance's outputs → the inner outputs feeding nothing inside, or listed as external
    open_outputs = [(int(t.get("index", i)), s) for i, t in enumerate(inner) for s, _ in enumerate(t.get("outputs")
                    or []) if (int(t.get("index", i)), s) not in feeding or (int(t.get("index", i)), s) in external]
    for (index, slot), outer in zip(open_outputs, instance.get("outputs") or [], strict=False):
        for link_id in outer.get("links") or []:
            _, _, to_node, to_slot, kind = links[str(link_id)]
            links[str(link_id)] = (ids[index], slot, to_node, to_slot, kind)
    # the instance's widget values, node after node
    values = instance.get("widgets_values")
    if isinstance(values, list):
        position = 0
        for node in new.values():
            if node.get("type") not in NODES:
                continue
            count = len(widget_names(node["type"]))
            if count:
                node["widgets_values"] = list(values[position:position + count])
                position += count
    del nodes[group_id]
    nodes.update(new)
