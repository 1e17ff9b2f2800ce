"""Where the time of `comfyui_workflow.py`'s workflow goes, component by component, cascade_lab against ComfyUI.

    PYTHONPATH=$PWD:/tmp/stubs /tmp/oracle/bin/python benchmarks/comfyui_components.py modules --dir /tmp/cw \\
        --comfyui /tmp/comfy     # one process: cascade_lab and its pluggy importable in ComfyUI's environment
    python benchmarks/comfyui_components.py phases --who cascade_lab --dir /tmp/cw
    PYTHONPATH=/tmp/stubs /tmp/oracle/bin/python benchmarks/comfyui_components.py phases --who comfyui --dir /tmp/cw

``modules``: Stage C's and Stage B's forward (batch 2, as CFG runs them) and Stage A's decode built by both
projects from the same state dicts of the work folder (`comfyui_workflow.py prepare`), timed in one process,
rounds interleaved with the order rotating, 1 thread; medians of all rounds but the first. ``phases``: one full
workflow run (`comfyui_workflow.py`'s) with timers around imports, model loading, text encoding, every model
call and the sampler nodes; "sampler overhead" is the KSampler nodes' time less the model calls and the loads
inside them (cascade_lab loads a model when a node first needs it).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _workflow_module() -> Any:
    spec = importlib.util.spec_from_file_location("comfyui_workflow", HERE / "comfyui_workflow.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state_dicts(path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    vae = {k[4:]: v.float() if v.is_floating_point() else v for k, v in sd.items() if k.startswith("vae.")}
    return unet, vae


def _comfy_keys(state: dict) -> dict:
    """ComfyUI's cascade attention holds separate to_q / to_k / to_v where the checkpoint packs in_proj."""
    out = {}
    for key, value in state.items():
        if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            base, kind = key.rsplit(".", 1)
            for name, part in zip("qkv", value.chunk(3, 0), strict=True):
                out[f"{base}.to_{name}.{kind.removeprefix('in_proj_')}"] = part.contiguous()
        else:
            out[key] = value
    return out


def _interleave(label: str, calls: dict[str, Callable[[], Any]], rounds: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:] if len(v) > 2 else v) for k, v in times.items()}
    return {"component": label, **{k: round(v, 3) for k, v in med.items()},
            "ratio": round(med["cascade_lab"] / med["comfyui"], 3), "loadavg": os.getloadavg()[0]}


def modules(folder: Path, source: Path, rounds: int) -> None:
    sys.path.insert(0, str(source))
    sys.argv = ["x", "--cpu", "--force-fp32"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.ops
    import torch
    from comfy.ldm.cascade.stage_a import StageA as ComfyStageA
    from comfy.ldm.cascade.stage_b import StageB as ComfyStageB
    from comfy.ldm.cascade.stage_c import StageC as ComfyStageC

    from cascade_lab.models import StageA, StageB, StageC

    torch.set_num_threads(1)
    torch.manual_seed(0)
    configs = json.loads((folder / "configs.json").read_text())
    ops = comfy.ops.disable_weight_init
    checkpoints = folder / "models" / "checkpoints"
    with torch.no_grad():
        unet, _ = _state_dicts(checkpoints / "stable_cascade_stage_c.safetensors")
        ours, theirs = StageC(**configs["stage_c"]).eval(), ComfyStageC(**configs["stage_c"], operations=ops).eval()
        ours.load_state_dict(unet)
        theirs.load_state_dict(_comfy_keys(unet))
        c_args = (torch.randn(2, 16, 12, 12), torch.full((2,), 0.7), torch.randn(2, 77, 24), torch.randn(2, 1, 24),
                  torch.zeros(2, 1, 768))
        with ours.conditioning_cache():  # as sampling runs it
            print(json.dumps(_interleave("stage_c forward (batch 2, 12x12)", {
                "cascade_lab": lambda: ours(*c_args), "comfyui": lambda: theirs(*c_args)}, rounds)), flush=True)
        unet, vae = _state_dicts(checkpoints / "stable_cascade_stage_b.safetensors")
        ours_b, theirs_b = StageB(**configs["stage_b"]).eval(), ComfyStageB(**configs["stage_b"], operations=ops).eval()
        ours_b.load_state_dict(unet)
        theirs_b.load_state_dict(_comfy_keys(unet))
        b_args = (torch.randn(2, 4, 128, 128), torch.full((2,), 0.5), torch.randn(2, 16, 12, 12), torch.randn(2, 1, 24))
        with ours_b.conditioning_cache():
            print(json.dumps(_interleave("stage_b forward (batch 2, 128x128)", {
                "cascade_lab": lambda: ours_b(*b_args), "comfyui": lambda: theirs_b(*b_args)}, rounds)), flush=True)
        ours_a, theirs_a = StageA().eval(), ComfyStageA().eval()
        ours_a.load_state_dict(vae)
        theirs_a.load_state_dict(vae)
        z = torch.randn(1, 4, 128, 128)
        print(json.dumps(_interleave("stage_a decode (128x128 latent -> 512x512)", {
            "cascade_lab": lambda: ours_a.decode(z),
            "comfyui": lambda: theirs_a.decode(z * ours_a.scale_factor)}, rounds)), flush=True)


def phases(folder: Path, source: Path, who: str, dtype: str) -> None:
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t
                if label == "load models" and who == "cascade_lab":
                    spent[f"load {args[2]}"] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    workflow = _workflow_module()
    t0 = time.perf_counter()
    if who == "cascade_lab":
        import cascade_lab.comfyui.execute as execute
        import cascade_lab.comfyui.models as files
        import cascade_lab.comfyui.prompt as prompt
        from cascade_lab.models import StageA, StageB, StageC

        spent["imports"] = time.perf_counter() - t0
        timed(files.ModelFiles, "_load", "load models")
        timed(prompt, "encode", "text encode")
        sampler = execute.Executor, "node_KSampler"
    else:
        sys.path.insert(0, str(source))
        sys.argv = ["x", "--cpu"] + (["--bf16-unet"] if dtype == "bf16" else ["--force-fp32"])
        import comfy.options

        comfy.options.enable_args_parsing()
        sys.meta_path.append(workflow._StandIns())
        import comfy.ldm.cascade.stage_a as comfy_a
        import comfy.ldm.cascade.stage_b as comfy_b
        import comfy.ldm.cascade.stage_c as comfy_c
        import comfy.sd
        import execution  # noqa: F401  (imported here so that "imports" counts it)
        import nodes

        StageA, StageB, StageC = comfy_a.StageA, comfy_b.StageB, comfy_c.StageC  # noqa: N806
        spent["imports"] = time.perf_counter() - t0
        timed(comfy.sd, "load_checkpoint_guess_config", "load models")
        timed(comfy.sd.CLIP, "encode_from_tokens", "text encode")
        sampler = nodes.KSampler, "sample"
    timed(StageC, "forward", "stage_c forward")
    timed(StageB, "forward", "stage_b forward")
    timed(StageA, "decode", "stage_a decode")
    timed(*sampler, "sampler nodes")
    if who == "cascade_lab":
        run = workflow.run_cascade_lab(folder, dtype)
    else:
        run = workflow.run_comfyui(folder, source, dtype)
    spent["total"] = time.perf_counter() - t0
    spent["sampler overhead"] = spent["sampler nodes"] - spent["stage_c forward"] - spent["stage_b forward"] - (
        spent.get("load stage_c", 0.0) + spent.get("load stage_b", 0.0))
    print(json.dumps({"who": who, "dtype": dtype, **{k: round(v, 3) for k, v in spent.items()},
                      "sampling": round(run["sampling_s"], 3), "mean": run["mean"], "loadavg": os.getloadavg()[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("modules", "phases"))
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--comfyui", type=Path, default=Path("/tmp/comfy"))
    ap.add_argument("--who", choices=("cascade_lab", "comfyui"), default="cascade_lab")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.what == "modules":
        modules(args.dir, args.comfyui, args.rounds)
    else:
        phases(args.dir, args.comfyui, args.who, args.dtype)


if __name__ == "__main__":
    main()
