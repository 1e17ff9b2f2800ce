"""``%cascade comfyui run FILE [--set NODE.INPUT=VALUE ...]``: a ComfyUI workflow run in the kernel, each
SaveImage / PreviewImage node's `Result` displayed (PNG with its parameters, ``%cascade inspect`` works on it)."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser

RESULTS = "_comfyui"  # where the last run's outputs are left in the notebook

PARSER = MagicArgumentParser(prog="%cascade comfyui run", description="Run a ComfyUI workflow on cascade_lab.")
PARSER.allow_abbrev = False
PARSER.add_argument("workflow", help="a ComfyUI workflow: .json (UI or API form) or a PNG saved by ComfyUI")
PARSER.add_argument("--set", dest="settings", nargs="+", action="extend", default=[], metavar="NODE.INPUT=VALUE",
                    help="change node inputs first, e.g. --set 3.seed=5 6.text='a fox'")
PARSER.add_argument("--models", default=None, help="the ComfyUI install or its models/ (default $CASCADE_LAB_COMFYUI)")
PARSER.add_argument("--input", default=None, help="LoadImage's folder (default: the install's input/)")
PARSER.add_argument("-o", "--output", default=None, help="folder for the SaveImage PNGs (default: none written)")
PARSER.add_argument("--as", dest="name", default=None, help=f"also store the outputs as NAME (always: {RESULTS})")
PARSER.add_argument("--configs", default=None, metavar="JSON", help="model configs for sizes a header cannot name")
PARSER.add_argument("--tokenizer", default=None, help="a CLIP tokenizer folder (vocab.json + merges.txt)")

USAGE = "%cascade comfyui run FILE [--set NODE.INPUT=VALUE ...] [--models DIR] [-o DIR] [--as NAME]"


def comfyui_command(shell: Any, args: list[str]) -> Any:
    """The ``%cascade comfyui ...`` subcommand; user mistakes are one-line `UsageError`s."""
    from IPython.display import display

    from . import WorkflowError, parse_setting, run

    if not args or args[0] != "run":
        raise UsageError(f"%cascade comfyui: write {USAGE}")
    try:
        options = PARSER.parse_args(args[1:])
    except SystemExit:
        raise UsageError(f"%cascade comfyui run: {PARSER.format_usage().strip()}") from None
    from ..notebook.display import StageBars
    from ..notebook.session import JobRunning, get_session

    session = get_session()
    bars = StageBars()

    def progress(event: Any) -> None:  # one bar per KSampler node
        bars.step(f"node {event.node} · Stage {event.stage.upper()}", event.steps)

    try:
        settings = dict(parse_setting(s) for s in options.settings)
        configs = None
        if options.configs:
            import json
            from pathlib import Path

            configs = json.loads(Path(options.configs).read_text(encoding="utf-8"))
        with session.job(f"ComfyUI workflow {options.workflow}"):
            outputs = run(options.workflow, models=options.models, set=settings, input_dir=options.input,
                          output_dir=options.output, configs=configs, tokenizer=options.tokenizer,
                          callback=progress, cancel=session.token)
    except (WorkflowError, FileNotFoundError, ValueError, JobRunning) as exc:
        raise UsageError(f"%cascade comfyui run: {exc}") from None
    except Exception as exc:
        if type(exc).__name__ != "Cancelled":  # diffusion.Cancelled: stopped between two steps, on request
            raise
        print("cancelled: the workflow stopped between two steps; nothing was written")
        return None
    shell.user_ns[RESULTS] = outputs
    if options.name:
        shell.user_ns[options.name] = outputs
    for node_id, result in outputs.items():
        files = outputs.files.get(node_id, [])
        saved = f" → {', '.join(map(str, files))}" if files else ""
        print(f"node {node_id} {outputs.graph[node_id]['class_type']}{saved}")
        display(result)
        _remember(result)
    return None


def _remember(result: Any) -> None:
    """The newest result for ``%cascade inspect``, kept with the session's generations."""
    from ..notebook.session import get_session

    get_session().results.append(result)
