"""ComfyUI workflows on cascade_lab: read the UI form, the API form or a ComfyUI PNG, check the graph before any
model loads, run Stable Cascade's node set with ComfyUI's numbers (`run`). Importing this imports no torch."""

from __future__ import annotations

from .nodes import NODES
from .run import WorkflowOutputs, check, run
from .workflow import WorkflowError, apply_settings, parse_setting, read_workflow, ui_to_api

__all__ = ["NODES", "WorkflowError", "WorkflowOutputs", "apply_settings", "check", "parse_setting", "read_workflow",
           "run", "ui_to_api"]
