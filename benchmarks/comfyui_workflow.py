"""One full ComfyUI workflow (the official text_to_image example) timed in cascade_lab (`cascade_lab.comfyui.run`)
and in ComfyUI's own executor (`execution.PromptExecutor`), on the same CPU, files, steps and thread count.

    python benchmarks/comfyui_workflow.py prepare --dir /tmp/cw            # the models, tokenizer, workflow
    python benchmarks/comfyui_workflow.py cascade_lab --dir /tmp/cw [--dtype bf16]
    PYTHONPATH=/tmp/stubs /tmp/oracle/bin/python benchmarks/comfyui_workflow.py comfyui --dir /tmp/cw \\
        --comfyui /tmp/comfy [--dtype bf16]
    python benchmarks/comfyui_workflow.py compare --dir /tmp/cw --comfyui /tmp/comfy \\
        --comfy-python "/tmp/oracle/bin/python" --comfy-pythonpath /tmp/stubs     # both, alternating

The models are mid-size (Stage C ~0.2 B, Stage B ~0.2 B parameters, built from configs and seeded at random) in
ComfyUI's checkpoint layout; Stage A is the real-size one; the text encoder is the reference's tiny CLIP-G (its
cost is negligible in both). ComfyUI cannot name sizes other than full / lite from a header, so its model detection
is given the same configs (one wrapper in this script). Each run is a fresh process: the time is the whole
workflow, loading included, and the sampling part alone (the KSampler → VAEDecode nodes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "comfyui"
STAGE_C = {"c_cond": 1024, "c_hidden": [1024, 1024], "nhead": [16, 16], "blocks": [[2, 4], [4, 2]],
           "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"], "c_clip_text": 24,
           "c_clip_text_pooled": 24, "c_clip_img": 768, "c_clip_seq": 4, "dropout": [0.0, 0.0]}
STAGE_B = {"c_hidden": [320, 640, 640, 640], "nhead": [-1, -1, 10, 10], "blocks": [[2, 2, 4, 2], [2, 4, 2, 2]],
           "block_repeat": [[1, 1, 1, 1], [2, 2, 1, 1]], "c_clip": 24, "dropout": [0.0, 0.0, 0.0, 0.0]}
SIZE, STEPS_C, STEPS_B = 512, 4, 3
SETTINGS = {"34.width": SIZE, "34.height": SIZE, "3.steps": STEPS_C, "33.steps": STEPS_B}


def workflow() -> dict:
    graph = json.loads((REFERENCE / "workflows" / "text_to_image.api.json").read_text())
    graph["41"]["inputs"]["ckpt_name"] = "stable_cascade_stage_c.safetensors"
    graph["42"]["inputs"]["ckpt_name"] = "stable_cascade_stage_b.safetensors"
    for key, value in SETTINGS.items():
        node, name = key.split(".")
        graph[node]["inputs"][name] = value
    graph["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}  # nothing written by either
    return graph


def prepare(folder: Path, wheel: str | None) -> None:
    """The ComfyUI tree: models/checkpoints with the two mid-size checkpoints, a CLIP tokenizer, the workflow."""
    import torch
    from safetensors.torch import load_file, save_file

    from cascade_lab.comfyui.tokenizer import write_clip_tokenizer
    from cascade_lab.models import StageA, StageB, StageC

    torch.manual_seed(0)
    checkpoints = folder / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    tiny_c = load_file(str(REFERENCE / "models" / "stable_cascade_stage_c_tiny.safetensors"))
    keep = {k: v for k, v in tiny_c.items() if k.startswith("text_encoder.")}  # the tiny CLIP-G only
    stage_c = StageC(**STAGE_C)
    stage_b = StageB(**STAGE_B)
    stage_a = StageA()  # the official size
    for module in (stage_c, stage_b):
        for p in module.parameters():  # small random weights: the activations stay finite over the steps
            p.data.normal_(0, 0.02)
    save_file({**keep, **{f"model.diffusion_model.{k}": v.half().contiguous() for k, v in
                          stage_c.state_dict().items()}}, str(checkpoints / "stable_cascade_stage_c.safetensors"))
    save_file({**{f"model.diffusion_model.{k}": v.half().contiguous() for k, v in stage_b.state_dict().items()},
               **{f"vae.{k}": v.half().contiguous() if v.is_floating_point() else v
                  for k, v in stage_a.state_dict().items()}}, str(checkpoints / "stable_cascade_stage_b.safetensors"))
    write_clip_tokenizer(folder / "tokenizer", wheel)
    tiny = json.loads((REFERENCE / "config.json").read_text())["tiny"]
    (folder / "configs.json").write_text(json.dumps({"stage_c": STAGE_C, "stage_b": STAGE_B,
                                                     "text_encoder": tiny["clip_g_model_config"]}))
    (folder / "workflow.api.json").write_text(json.dumps(workflow(), indent=1))
    count = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in
             (("stage_c", stage_c), ("stage_b", stage_b), ("stage_a", stage_a))}
    print("parameters (M):", {k: round(v, 1) for k, v in count.items()})


def run_cascade_lab(folder: Path, dtype: str) -> dict:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from cascade_lab.comfyui import run

    configs = json.loads((folder / "configs.json").read_text())
    marks: dict[str, float] = {}

    def progress(event: object) -> None:
        marks.setdefault("first_step", time.perf_counter())

    out = run(folder / "workflow.api.json", models=folder, configs=configs, tokenizer=folder / "tokenizer",
              callback=progress, dtype=dtype)
    total = time.perf_counter() - t0
    image = out.images["9"]
    return {"total_s": total, "sampling_s": total - (marks.get("first_step", t0) - t0), "mean": float(image.mean()),
            "shape": list(image.shape)}


class _StandIns:
    """Stand-ins for ComfyUI modules named *tokenizer* that the extracted source lacks (no Stable Cascade node
    uses them; other models' modules import them): a package whose every attribute is an empty class."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        import importlib.machinery

        if name.startswith("comfy") and "tokenizer" in name:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: object) -> object:
        return None

    def exec_module(self, module: object) -> None:
        module.__path__ = []  # type: ignore[attr-defined]
        module.__getattr__ = lambda attr: type(attr, (), {})  # type: ignore[attr-defined]


def run_comfyui(folder: Path, source: Path, dtype: str) -> dict:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sys.path.insert(0, str(source))
    sys.argv = ["x", "--cpu"] + (["--bf16-unet"] if dtype == "bf16" else ["--force-fp32"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import asyncio

    sys.meta_path.append(_StandIns())  # the extracted source lacks ComfyUI's tokenizer modules

    import comfy.model_detection as detection
    import comfy.sd1_clip as sd1_clip
    import execution
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("checkpoints", str(folder / "models" / "checkpoints"), is_default=True)
    configs = json.loads((folder / "configs.json").read_text())
    detect = detection.detect_unet_config

    def sized(state_dict: dict, key_prefix: str, *args: object, **kwargs: object) -> dict:
        """ComfyUI names only the full and lite sizes from a header: the mid-size configs of this benchmark."""
        config = detect(state_dict, key_prefix, *args, **kwargs)
        stage = config.get("stable_cascade_stage") if isinstance(config, dict) else None
        if stage in ("c", "b"):
            config.update(configs[f"stage_{stage}"])
        return config

    detection.detect_unet_config = sized
    clip_json = folder / "clip_g_tiny.json"
    bigg = json.loads((source / "comfy" / "clip_config_bigg.json").read_text())
    clip_json.write_text(json.dumps({**bigg, **configs["text_encoder"]}))
    model_init, tokenizer_init = sd1_clip.SDClipModel.__init__, sd1_clip.SDTokenizer.__init__

    def tiny_clip(self: object, *args: object, textmodel_json_config: object = None, **kwargs: object) -> None:
        model_init(self, *args, textmodel_json_config=str(clip_json), **kwargs)

    def tokenizer(self: object, tokenizer_path: object = None, *args: object, **kwargs: object) -> None:
        tokenizer_init(self, str(folder / "tokenizer"), *args, **kwargs)

    sd1_clip.SDClipModel.__init__ = tiny_clip
    sd1_clip.SDTokenizer.__init__ = tokenizer
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    import comfy.utils

    comfy.utils.set_progress_bar_global_hook(lambda *args, **kwargs: marks.setdefault("first_step",
                                                                                       time.perf_counter()))

    class Server:
        client_id = None
        last_node_id = None
        last_prompt_id = None

        def send_sync(self, event: str, data: object, sid: object = None) -> None:
            pass

    marks: dict[str, float] = {}
    seen: dict[str, float] = {}
    save = nodes.PreviewImage.save_images

    def keep(self: object, images: object, *args: object, **kwargs: object) -> object:
        seen["mean"] = float(images.float().mean())  # type: ignore[attr-defined]
        return save(self, images, *args, **kwargs)

    nodes.PreviewImage.save_images = keep
    prompt = json.loads((folder / "workflow.api.json").read_text())
    valid = asyncio.run(execution.validate_prompt("bench", prompt, None))
    assert valid[0], valid
    executor = execution.PromptExecutor(Server(), cache_type=False, cache_args={"lru": 0, "ram": 0.0})
    executor.execute(prompt, "bench", {}, valid[2])
    assert executor.success, executor.status_messages[-3:]
    total = time.perf_counter() - t0
    images = executor.history_result["outputs"]
    return {"total_s": total, "sampling_s": total - (marks.get("first_step", t0) - t0), "mean": seen.get("mean"),
            "outputs": list(images)}


def compare(args: argparse.Namespace) -> None:
    """Alternate fresh processes of both, ``--repeats`` each, and print the medians and the ratio."""
    import statistics

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    comfy_env = {**env, "PYTHONPATH": args.comfy_pythonpath}
    here = Path(__file__).resolve()
    times: dict[str, list[dict]] = {"cascade_lab": [], "comfyui": []}
    for _ in range(args.repeats):
        for who, python, extra, e in (("cascade_lab", sys.executable, [], env),
                                      ("comfyui", args.comfy_python, ["--comfyui", str(args.comfyui)], comfy_env)):
            out = subprocess.run([python, str(here), who, "--dir", str(args.dir), "--dtype", args.dtype, *extra],
                                 env=e, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{who} failed:\n{out.stderr[-3000:]}")
            times[who].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(who, times[who][-1], flush=True)
    load = os.getloadavg()
    summary = {}
    for key in ("total_s", "sampling_s"):
        ours = statistics.median(t[key] for t in times["cascade_lab"])
        theirs = statistics.median(t[key] for t in times["comfyui"])
        summary[key] = {"cascade_lab": round(ours, 2), "comfyui": round(theirs, 2), "ratio": round(ours / theirs, 3)}
    print(json.dumps({"dtype": args.dtype, "repeats": args.repeats, "loadavg": load, **summary}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("prepare", "cascade_lab", "comfyui", "compare"))
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--comfyui", type=Path, default=Path("/tmp/comfy"))
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--wheel", help="the open_clip_torch wheel (CLIP's BPE file; default: an installed open_clip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--comfy-python", default="/tmp/oracle/bin/python")
    ap.add_argument("--comfy-pythonpath", default="/tmp/stubs")
    args = ap.parse_args()
    if args.what == "prepare":
        prepare(args.dir, args.wheel)
    elif args.what == "cascade_lab":
        print(json.dumps(run_cascade_lab(args.dir, args.dtype)))
    elif args.what == "comfyui":
        print(json.dumps(run_comfyui(args.dir, args.comfyui, args.dtype)))
    else:
        compare(args)


if __name__ == "__main__":
    main()
