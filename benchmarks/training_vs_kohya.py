"""Training step time and peak memory: cascade_lab against kohya sd-scripts' ``stable-cascade`` branch (issue 19).

Both train the same mid-size Stage C (from one original-layout file) on the same tiny dataset with the same kohya
command line: cascade_lab reads it with `cascade_lab.training.kohya_args.parse_kohya`, kohya runs its own script
(``stable_cascade_train_c_network.py`` for LoRA, ``stable_cascade_train_stage_c.py`` for the full fine-tune) from
its source in its own venv. Each measurement is a fresh process; the contenders alternate (A, B, A, B ...).

    python benchmarks/training_vs_kohya.py prepare --dir /tmp/tvk      # checkpoint, EffNet, text encoder, data
    python benchmarks/training_vs_kohya.py compare --dir /tmp/tvk --mode lora --precision no \\
        --kohya-python /tmp/kohya_venv/bin/python --kohya-src /tmp/kohya_sc

kohya builds Stage C, EfficientNet and the text model with fixed constructors (the 3.6 B StageC(), torchvision's
efficientnet_v2_s(weights="DEFAULT") which downloads, the 32-layer CLIP-G config). Its child process here changes
only those constructions: StageC's defaults become the mid-size config, the EfficientNet is built without the
download (the weights come from the file as before), the text model config gets the small layer count. Everything
else is kohya's training code run unchanged (``runpy`` of its script with its own argv).

Measured in each process: the wall-clock and process CPU time between consecutive optimizer steps (a global
optimizer step post-hook; warm-up steps dropped, median of the rest; with 1 thread the CPU time hardly moves
when other jobs load the machine) and peak RSS (VmHWM): "steps" is the peak of the measured steps alone
(VmHWM reset through /proc/self/clear_refs after the warm-up), "process" the peak of the whole process up to the
last step (loading, caching and the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import peak_rss_bytes  # stdlib only: the kohya child imports it in kohya's venv

HERE = Path(__file__).resolve().parent
# the mid-size Stage C of the CPU benchmarks (_twins.STAGE_C_MID: 139 M parameters), dropout off on both sides
# (kohya's --sdpa applies its dropout value unconditionally, so 0 keeps the two computing the same thing)
STAGE_C_MID: dict[str, Any] = {"c_cond": 768, "c_hidden": [768, 768], "nhead": [12, 12], "blocks": [[2, 6], [6, 2]],
                               "dropout": [0.0, 0.0]}
# a small CLIP-G-shaped text model (real widths 1280, 2 layers): only used to fill the text cache
TEXT_LAYERS = 2
KOHYA_TOKENIZER = "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"  # kohya's --tokenizer_cache_dir folder name
IMAGES, RESOLUTION, BATCH = 4, 512, 2


# -- measurement probe (both children; stdlib + torch only) ------------------------------------------------------
def _install_probe(warmup: int, total: int, result: Path, profile: bool = False) -> dict[str, Any]:
    """Time every optimizer step and read VmHWM: reset after the warm-up, written to `result` at the last step.

    profile: torch.profiler over the measured steps, its table printed at the last step.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    state: dict[str, Any] = {"ends": [time.perf_counter()], "cpu": [time.process_time()], "steps": 0,
                             "marks": [], "phases": [], "faults": [resource.getrusage(resource.RUSAGE_SELF).ru_minflt]}
    # phases of each step, from process CPU time (both sides call torch.autograd.backward once per step): up to the
    # backward (data, forward, loss), the backward, from there to the optimizer (clipping), the optimizer step
    real_backward = torch.autograd.backward

    depth = [0]  # a reentrant checkpoint runs backward inside the backward: only the outer one is a phase

    def timed_backward(*args: Any, **kwargs: Any) -> Any:
        depth[0] += 1
        if depth[0] == 1:
            state["marks"].append(time.process_time())
        try:
            return real_backward(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                state["marks"].append(time.process_time())

    torch.autograd.backward = timed_backward

    def pre_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        if type(optimizer).__name__ != "AcceleratedOptimizer":
            state["marks"].append(time.process_time())

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        if type(optimizer).__name__ == "AcceleratedOptimizer":  # accelerate's wrapper; the inner one counts
            return
        marks, state["marks"] = state["marks"], []
        if len(marks) == 3:
            state["phases"].append([marks[0] - state["cpu"][-1], marks[1] - marks[0], marks[2] - marks[1],
                                    time.process_time() - marks[2]])
        state["steps"] += 1
        state["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        state["ends"].append(time.perf_counter())
        state["cpu"].append(time.process_time())
        if state["steps"] == warmup:
            state["peak_setup"] = peak_rss_bytes()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM: the next reading is the peak of the measured steps
            if profile:
                state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                           record_shapes=True)
                state["profiler"].__enter__()
        if state["steps"] == total:
            ends = state["ends"]
            times = [b - a for a, b in zip(ends[warmup:-1], ends[warmup + 1:], strict=True)]
            cpu = [b - a for a, b in zip(state["cpu"][warmup:-1], state["cpu"][warmup + 1:], strict=True)]
            peak_steps = peak_rss_bytes()
            result.write_text(json.dumps({"step_times": times, "cpu_times": cpu, "peak_steps": peak_steps,
                                          "phases": state["phases"][warmup:],
                                          "faults": [b - a for a, b in zip(state["faults"][warmup:-1],
                                                                           state["faults"][warmup + 1:],
                                                                           strict=True)],
                                          "peak_process": max(peak_steps, state.get("peak_setup", 0)),
                                          "threads": torch.get_num_threads(), "torch": torch.__version__}))
            if "profiler" in state:
                state["profiler"].__exit__(None, None, None)
                averages = state["profiler"].key_averages()
                print(averages.table(sort_by="self_cpu_time_total", row_limit=45), flush=True)
                by_shape = state["profiler"].key_averages(group_by_input_shape=True)
                print(by_shape.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=40,
                                     max_shapes_column_width=70), flush=True)

    register_optimizer_step_pre_hook(pre_hook)
    register_optimizer_step_post_hook(hook)
    return state


# -- the shared command line -------------------------------------------------------------------------------------
def kohya_argv(folder: Path, mode: str, precision: str, steps: int, out: Path, checkpointing: bool,
               optimizer: str = "adamw", network_dropout: float = 0.0) -> list[str]:
    argv = ["--stage_c_checkpoint_path", str(folder / "stage_c_mid.safetensors"),
            "--effnet_checkpoint_path", str(folder / "effnet.safetensors"),
            "--text_model_checkpoint_path", str(folder / "text_model.safetensors"),
            "--tokenizer_cache_dir", str(folder / "tokenizers"), "--dataset_config", str(folder / "dataset.toml"),
            "--output_dir", str(out), "--output_name", "bench", "--save_model_as", "safetensors",
            "--max_train_steps", str(steps), "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--max_grad_norm", "1.0", "--mixed_precision", precision,
            "--cache_latents", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
            "--cache_text_encoder_outputs_to_disk", "--sdpa", "--seed", "0", "--max_data_loader_n_workers", "0"]
    if checkpointing:
        argv.append("--gradient_checkpointing")
    if optimizer == "adafactor":  # the seed command: kohya's README arguments
        argv += ["--optimizer_type", "adafactor", "--optimizer_args", "scale_parameter=False", "relative_step=False",
                 "warmup_init=False"]
    else:
        argv += ["--optimizer_type", "AdamW"]
    if mode == "lora":
        argv += ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1",
                 "--network_train_unet_only"]
        if network_dropout:
            argv += ["--network_dropout", str(network_dropout)]
    return argv


# -- prepare -----------------------------------------------------------------------------------------------------
def prepare(folder: Path, wheel: str | None) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from cascade_lab.comfyui.tokenizer import write_clip_tokenizer
    from cascade_lab.models import StageC
    from cascade_lab.models.tiny import calibrated_random_effnet

    sys.path.insert(0, str(HERE))
    from _twins import STAGE_C_MID as TWINS_MID
    from _twins import randomize

    assert STAGE_C_MID == TWINS_MID, "keep STAGE_C_MID equal to _twins.STAGE_C_MID (kohya's child cannot import it)"

    folder.mkdir(parents=True, exist_ok=True)
    stage_c = randomize(StageC(**STAGE_C_MID), seed=0)
    save_file({k: v.contiguous() for k, v in stage_c.state_dict().items()}, str(folder / "stage_c_mid.safetensors"))
    print(f"Stage C: {sum(p.numel() for p in stage_c.parameters()) / 1e6:.1f} M parameters")
    effnet = calibrated_random_effnet()
    save_file({k: v.contiguous() for k, v in effnet.state_dict().items()}, str(folder / "effnet.safetensors"))
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=TEXT_LAYERS,
                            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
                            hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=1)
    text = CLIPTextModelWithProjection(config).eval()
    text_dir = folder / "text_encoder"
    text.save_pretrained(str(text_dir))
    tensors = {k: v.contiguous() for k, v in text.state_dict().items() if "position_ids" not in k}
    save_file(tensors, str(folder / "text_model.safetensors"))
    for tok in (text_dir, folder / "tokenizers" / KOHYA_TOKENIZER):
        write_clip_tokenizer(tok, wheel)
        (tok / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}))
    data = folder / "data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        small = rng.random((8, 8, 3))
        img = Image.fromarray((small * 255).astype(np.uint8)).resize((RESOLUTION, RESOLUTION), Image.BICUBIC)
        img.save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a photo of thing number {i}, smooth colours")
    (folder / "dataset.toml").write_text(
        f'[general]\ncaption_extension = ".txt"\nshuffle_caption = false\n\n[[datasets]]\n'
        f"resolution = {RESOLUTION}\nbatch_size = {BATCH}\nenable_bucket = false\n\n"
        f'  [[datasets.subsets]]\n  image_dir = "{data}"\n  num_repeats = 50\n')
    print(f"prepared {folder}")


# -- children ----------------------------------------------------------------------------------------------------
def child_cascade(folder: Path, mode: str, precision: str, warmup: int, steps: int, out: Path, threads: int,
                  checkpointing: bool, profile: bool = False, optimizer: str = "adamw",
                  checkpointing_mode: str = "auto", network_dropout: float = 0.0) -> None:
    import torch

    torch.set_num_threads(threads)
    from cascade_lab.models.stage_c import StageCConfig
    from cascade_lab.training import train
    from cascade_lab.training.config import TrainConfig
    from cascade_lab.training.kohya_args import parse_kohya
    from cascade_lab.weights import load_stage

    total = warmup + steps
    fields, _, _ = parse_kohya(kohya_argv(folder, mode, precision, total, out, checkpointing, optimizer,
                                          network_dropout))
    # the text model as a transformers folder (its small config), the Stage C object loaded as the trainer would
    # load a file (a LoRA's frozen base in the compute dtype, a full fine-tune in fp32): a mid size has no variant
    fields.update(text_encoder_path=str(folder / "text_encoder"), stage_c_path=None, val_every_n_steps=0,
                  caption_dropout_rate=0.0, overwrite=True, cache_dir=str(folder / "cascade_cache"),
                  val_items=2, val_timesteps=[0.5],  # its validation (before step 1, after the last) kept short
                  gradient_checkpointing_mode=checkpointing_mode)
    config = TrainConfig.from_dict(fields, source="benchmark")
    dtype = torch.bfloat16 if mode == "lora" and precision == "bf16" else torch.float32
    stage_c = load_stage("stage_c", str(folder / "stage_c_mid.safetensors"), dtype=dtype, mmap=False,
                         config=StageCConfig(**STAGE_C_MID))
    _install_probe(warmup, total, out / "result.json", profile)
    run = train(config, stage_c=stage_c)
    if run.status != "finished":
        raise SystemExit(f"cascade_lab run ended {run.status}: {run.error}")


def child_kohya(folder: Path, mode: str, precision: str, warmup: int, steps: int, out: Path, threads: int,
                checkpointing: bool, src: Path, profile: bool = False, optimizer: str = "adamw",
                network_dropout: float = 0.0) -> None:
    import runpy
    import types

    # torchvision's PyPI wheel is a CUDA build whose C ops cannot load with the CPU torch: import it without
    # registering those ops (Stable Cascade uses only its EfficientNetV2-S definition)
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch
    import torchvision

    torch.set_num_threads(threads)
    sys.path.insert(0, str(src))
    from library import stable_cascade as sc
    from library import stable_cascade_utils as sc_utils

    # 1. Stage C: the mid-size config instead of the 3.6 B defaults (same class name, which networks.lora keys on)
    base = sc.StageC

    class StageC(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**{**STAGE_C_MID, **kwargs})

    sc.StageC = StageC
    # 2. EfficientNet without the ImageNet download (the encoder's weights come from --effnet_checkpoint_path)
    build = torchvision.models.efficientnet_v2_s

    def efficientnet_v2_s(weights: Any = None, **kwargs: Any) -> Any:
        return build(weights=None, **kwargs)

    torchvision.models.efficientnet_v2_s = efficientnet_v2_s
    # 3. the text model: the same small layer count as the file
    config_class = sc_utils.CLIPTextConfig
    sc_utils.CLIPTextConfig = lambda **kw: config_class(**{**kw, "num_hidden_layers": TEXT_LAYERS})

    total = warmup + steps
    script = src / ("stable_cascade_train_c_network.py" if mode == "lora" else "stable_cascade_train_stage_c.py")
    _install_probe(warmup, total, out / "result.json", profile)
    sys.argv = [str(script), *kohya_argv(folder, mode, precision, total, out, checkpointing, optimizer,
                                         network_dropout)]
    os.chdir(src)
    runpy.run_path(str(script), run_name="__main__")


# -- compare -----------------------------------------------------------------------------------------------------
def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_one(who: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["--dir", str(args.dir), "--mode", args.mode, "--precision", args.precision, "--warmup",
              str(args.warmup), "--steps", str(args.steps), "--out", str(out), "--threads", str(args.threads)]
    if args.checkpointing:
        common.append("--checkpointing")
    common += ["--optimizer", args.optimizer, "--network-dropout", str(args.network_dropout)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if who == "cascade_lab":
        cmd = [sys.executable, __file__, "_cascade", *common, "--checkpointing-mode", args.checkpointing_mode]
    else:
        cmd = [args.kohya_python, __file__, "_kohya", *common, "--kohya-src", str(args.kohya_src)]
        env.pop("PYTHONPATH", None)
    load_before = _loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    result_file = out / "result.json"
    if not result_file.exists():
        raise SystemExit(f"{who} wrote no result (exit {proc.returncode}); see {out / 'log.txt'}:\n"
                         + (proc.stdout + proc.stderr)[-3000:])
    result = json.loads(result_file.read_text())
    for item in out.iterdir():  # the trained files and checkpoints (GBs for a full fine-tune): only timing is kept
        if item.name not in ("log.txt", "result.json"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    result.update(wall=wall, load_before=load_before, load_after=_loadavg(), exit=proc.returncode)
    return result


def compare(args: argparse.Namespace) -> None:
    records: dict[str, list[dict[str, Any]]] = {"cascade_lab": [], "kohya": []}
    order = ["cascade_lab", "kohya"]
    if args.prime:  # one short unmeasured run each, so both find their latent/text caches on disk
        for who in order:
            run_one(who, argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1}),
                    args.dir / "runs" / f"{who}-prime")
    med = statistics.median
    for r in range(args.rounds):
        for who in order if r % 2 == 0 else order[::-1]:
            res = run_one(who, args, args.dir / "runs" / f"{who}-{args.mode}-{args.precision}-{r}")
            records[who].append(res)
            print(f"round {r} {who:11s} step {med(res['step_times']):.3f} s, cpu {med(res['cpu_times']):.3f} s "
                  f"(steps {', '.join(f'{t:.2f}' for t in res['step_times'])}) peak steps "
                  f"{res['peak_steps'] / 2**20:.0f} MiB process {res['peak_process'] / 2**20:.0f} MiB "
                  f"load {res['load_before']} -> {res['load_after']}", flush=True)
    summary = {who: {"step": med(med(x["step_times"]) for x in rows), "cpu": med(med(x["cpu_times"]) for x in rows),
                     "peak_steps": med(x["peak_steps"] for x in rows),
                     "peak_process": med(x["peak_process"] for x in rows)} for who, rows in records.items()}
    a, b = summary["cascade_lab"], summary["kohya"]
    loads = [float(x[key].split()[0]) for rows in records.values() for x in rows for key in ("load_before",
                                                                                              "load_after")]
    setup = f"{args.mode} {args.precision} {args.optimizer}"
    if args.network_dropout and args.mode == "lora":  # kohya_argv passes it to LoRA runs only
        setup += f" network_dropout {args.network_dropout}"
    if args.checkpointing:
        setup += f" checkpointing (cascade_lab's mode: {args.checkpointing_mode}; auto is selective on a CPU)"
    print(f"\n{setup} (threads {args.threads}, batch {BATCH}, {RESOLUTION} px, "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up, load average "
          f"{min(loads):.1f}-{max(loads):.1f})")
    print("| | cascade_lab | kohya | ratio |\n|---|---|---|---|")
    for key, label in (("step", "step wall s"), ("cpu", "step CPU s")):
        rounds = [med(x[f"{key}_times" if key == "cpu" else "step_times"]) /
                  med(y[f"{key}_times" if key == "cpu" else "step_times"])
                  for x, y in zip(records["cascade_lab"], records["kohya"], strict=True)]
        print(f"| {label} (median) | {a[key]:.3f} | {b[key]:.3f} | **{med(rounds):.2f}** (median of the rounds' "
              f"ratios: {', '.join(f'{r:.2f}' for r in rounds)}) |")
    names = ("to backward", "backward", "to optimizer", "optimizer")
    if all(x.get("phases") for rows in records.values() for x in rows):
        phase = {who: [med(med(p[i] for p in x["phases"]) for x in rows) for i in range(4)]
                 for who, rows in records.items()}
        for i, name in enumerate(names):
            print(f"| {name} CPU s (median) | {phase['cascade_lab'][i]:.3f} | {phase['kohya'][i]:.3f} | "
                  f"{phase['cascade_lab'][i] / max(phase['kohya'][i], 1e-9):.2f} |")
    if all(x.get("faults") for rows in records.values() for x in rows):
        faults = {who: med(med(x["faults"]) for x in rows) for who, rows in records.items()}
        print(f"| minor page faults a step (median) | {faults['cascade_lab']:.0f} | {faults['kohya']:.0f} | "
              f"{faults['cascade_lab'] / max(faults['kohya'], 1):.2f} |")
    for key, label in (("peak_steps", "peak RSS, steps"), ("peak_process", "peak RSS, process")):
        print(f"| {label} MiB | {a[key] / 2**20:.0f} | {b[key] / 2**20:.0f} | **{a[key] / b[key]:.2f}** |")
    if args.json:
        Path(args.json).write_text(json.dumps({"records": records, "summary": summary, "args": {
            k: str(v) for k, v in vars(args).items()}}, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--wheel", default=os.environ.get("CASCADE_LAB_CLIP_BPE"),
                   help="open_clip wheel (or bpe file) with CLIP's vocabulary")
    for name in ("compare", "_cascade", "_kohya"):
        c = sub.add_parser(name)
        c.add_argument("--dir", type=Path, required=True)
        c.add_argument("--mode", choices=["lora", "full"], default="lora")
        c.add_argument("--precision", choices=["no", "bf16"], default="no")
        c.add_argument("--warmup", type=int, default=2)
        c.add_argument("--steps", type=int, default=6)
        c.add_argument("--threads", type=int, default=1)
        c.add_argument("--checkpointing", action="store_true", help="--gradient_checkpointing on both sides")
        c.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw",
                       help="adafactor: kohya's README arguments (scale_parameter/relative_step/warmup_init False)")
        c.add_argument("--kohya-src", type=Path, default=Path("/tmp/kohya_sc"))
        c.add_argument("--network-dropout", type=float, default=0.0,
                       help="LoRA: --network_dropout on both sides (cascade_lab's unfused path)")
        c.add_argument("--checkpointing-mode", choices=["auto", "full", "selective"], default="auto",
                       help="cascade_lab's gradient_checkpointing_mode (kohya recomputes whole blocks: full)")
        if name == "compare":
            c.add_argument("--kohya-python", default="/tmp/kohya_venv/bin/python")
            c.add_argument("--rounds", type=int, default=2)
            c.add_argument("--json", default=None)
            c.add_argument("--no-prime", dest="prime", action="store_false",
                           help="skip the unmeasured first run of each (fills the caches)")
        else:
            c.add_argument("--out", type=Path, required=True)
            c.add_argument("--profile", action="store_true", help="torch.profiler table of the measured steps")
    args = parser.parse_args(argv)
    args.dir = args.dir.resolve()
    if hasattr(args, "out"):
        args.out = args.out.resolve()
        args.out.mkdir(parents=True, exist_ok=True)
    if args.cmd == "prepare":
        prepare(args.dir, args.wheel)
    elif args.cmd == "compare":
        compare(args)
    elif args.cmd == "_cascade":
        child_cascade(args.dir, args.mode, args.precision, args.warmup, args.steps, args.out, args.threads,
                      args.checkpointing, args.profile, args.optimizer, args.checkpointing_mode, args.network_dropout)
    else:
        child_kohya(args.dir, args.mode, args.precision, args.warmup, args.steps, args.out, args.threads,
                    args.checkpointing, args.kohya_src, args.profile, args.optimizer, args.network_dropout)


if __name__ == "__main__":
    main()
