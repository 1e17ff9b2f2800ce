"""``cascade-lab comfyui run FILE -o DIR [--set NODE.INPUT=VALUE] [--models DIR]``."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="run the workflow; SaveImage nodes write their PNGs into -o DIR")
    check = actions.add_parser("check", help="check the workflow (nodes, links, types, files) without running it")
    for p in (run, check):
        p.add_argument("workflow", help="a ComfyUI workflow: .json (UI or API form) or a PNG saved by ComfyUI")
        p.add_argument("--models", default=None, help="the ComfyUI install (or its models/ folder) holding the "
                       "workflow's files (default $CASCADE_LAB_COMFYUI)")
        p.add_argument("--input", default=None, help="LoadImage's folder (default: the install's input/)")
        p.add_argument("--extra-model-paths", action="append", default=None, metavar="YAML",
                       help="an extra_model_paths.yaml to search too (repeatable)")
        p.add_argument("--set", dest="settings", action="append", default=[], metavar="NODE.INPUT=VALUE",
                       help="change a node input first, e.g. --set 3.seed=5 --set 6.text='a fox' (repeatable)")
    run.add_argument("-o", "--output", required=True, help="folder for the SaveImage nodes' PNGs (ComfyUI's names, "
                     "<prefix>_00001_.png, numbered after the files already there)")
    run.add_argument("--configs", default=None, metavar="JSON", help="a JSON file of model configs for sizes a file's "
                     "header cannot name, e.g. {\"stage_c\": {...}, \"text_encoder\": {...}}")
    run.add_argument("--tokenizer", default=None, help="a CLIP tokenizer folder (vocab.json + merges.txt)")
    run.add_argument("--quiet", action="store_true", help="no progress lines")


def run_command(args: Any) -> int:
    from . import check, parse_setting, run

    settings = dict(parse_setting(s) for s in args.settings)
    options = {"models": args.models, "set": settings, "input_dir": args.input,
               "extra_model_paths": args.extra_model_paths}
    if args.action == "check":
        graph = check(args.workflow, **options)
        print(f"{args.workflow}: {len(graph)} nodes, ready to run")
        return 0

    def progress(event: Any) -> None:
        if not args.quiet and (event.step + 1 == event.steps or event.step % 5 == 0):
            print(f"node {event.node} (Stage {event.stage.upper()}) step {event.step + 1}/{event.steps}", flush=True)

    configs = None
    if args.configs:
        import json
        from pathlib import Path

        configs = json.loads(Path(args.configs).read_text(encoding="utf-8"))
    outputs = run(args.workflow, output_dir=args.output, callback=progress, configs=configs,
                  tokenizer=args.tokenizer, **options)
    for node_id, files in outputs.files.items():
        for path in files:
            print(f"node {node_id}: {path}")
    for node_id in outputs:
        if node_id not in outputs.files:
            print(f"node {node_id} ({outputs.graph[node_id]['class_type']}): {len(outputs[node_id].images)} "
                  "image(s), not saved (a preview)")
    return 0
