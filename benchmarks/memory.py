"""Peak memory of a whole generation: stage swapping (`pipeline.Lazy` stages) against every stage resident.

Mid-size random-weight stages (Stage C 768 wide, blocks [[2,6],[6,2]]; Stage B [160,320,640,640]; the full
20M Stage A; a 4-layer, 1280-wide CLIP text tower) are written once to a temp folder — official-layout
safetensors for the stages, ``save_pretrained`` for the text tower — then each mode runs in a fresh
subprocess that loads them the way a user's session would (`cascade_lab.weights.load_stage`, mmap on)
and generates one 512² image, batch 1, with CFG. Steps are cut to 2 + 2: the peak does not depend on them.

* resident: every stage loaded up front and kept (``Stages`` of models), as `Cascade` on the CPU today;
* swapping: ``Stages`` of ``Lazy`` loaders: the text tower is loaded, used and released, then Stage C,
  then Stage B, then Stage A — one model in memory at a time.

Peak RSS is the child's VmHWM; "above imports" subtracts its VmHWM right after importing torch,
transformers and cascade_lab. Goal (issue 8): peak with swapping ≤ 1.15 × (largest stage + text encoder).

    .venv/bin/python benchmarks/memory.py [--dir /tmp/cascade_lab_mem] [--repeats 2] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

STAGE_C = {"c_cond": 768, "c_hidden": [768, 768], "nhead": [12, 12], "blocks": [[2, 6], [6, 2]], "dropout": [0, 0]}
STAGE_B = {"c_hidden": [160, 320, 640, 640], "nhead": [-1, -1, 10, 10], "blocks": [[2, 2, 6, 2], [2, 6, 2, 2]],
           "block_repeat": [[1, 1, 1, 1], [2, 2, 2, 2]], "dropout": [0, 0, 0, 0]}

WRITE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from cascade_lab.models import StageA, StageB, StageC
from cascade_lab.models.tiny import CharTokenizer
folder, dtype, stage_c, stage_b = Path(sys.argv[1]), getattr(torch, sys.argv[2]), *map(json.loads, sys.argv[3:5])
sizes = {}
for name, model in (("stage_c", StageC(**stage_c)), ("stage_b", StageB(**stage_b)), ("stage_a", StageA())):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{name}.safetensors"))
    sizes[name] = sum(v.numel() * v.element_size() for v in state.values())
    del model, state
tok = CharTokenizer()
config = CLIPTextConfig(vocab_size=len(tok), hidden_size=1280, intermediate_size=5120, num_hidden_layers=4,
                        num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
text = CLIPTextModelWithProjection(config).to(dtype)
text.save_pretrained(folder / "text_encoder")
sizes["text_encoder"] = sum(p.numel() * p.element_size() for p in text.parameters())
(folder / "sizes.json").write_text(json.dumps(sizes))
"""

RUN = r"""
import functools, json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch
from transformers import CLIPTextModelWithProjection
from cascade_lab.models.clip import TextEncoder
from cascade_lab.models.stage_b import StageBConfig
from cascade_lab.models.stage_c import StageCConfig
from cascade_lab.models.tiny import CharTokenizer
from cascade_lab.params import GenerationParams
from cascade_lab.pipeline import Lazy, Pipeline, Stages
from cascade_lab.weights import load_stage
folder, mode, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
stage_c, stage_b = StageCConfig(**json.loads(sys.argv[4])), StageBConfig(**json.loads(sys.argv[5]))
base = hwm()
t0 = time.perf_counter()
loaders = {
    "stage_c": Lazy(functools.partial(load_stage, "stage_c", f"{folder}/stage_c.safetensors", config=stage_c), stage_c),
    "stage_b": Lazy(functools.partial(load_stage, "stage_b", f"{folder}/stage_b.safetensors", config=stage_b)),
    "stage_a": Lazy(functools.partial(load_stage, "stage_a", f"{folder}/stage_a.safetensors")),
    "text_encoder": Lazy(lambda: TextEncoder(CLIPTextModelWithProjection.from_pretrained(f"{folder}/text_encoder"),
                                             CharTokenizer())),
}
if mode == "resident":
    loaders = {name: lazy.load() for name, lazy in loaders.items()}
stages = Stages(**loaders)
with torch.inference_mode():
    out = Pipeline(stages, dtype_c=dtype, dtype_b=dtype).run(
        GenerationParams("a lighthouse at dusk", width=512, height=512, steps_c=2, steps_b=2, seed=0))
print(json.dumps({"base": base, "peak": hwm(), "seconds": time.perf_counter() - t0,
                  "image": list(out.images.shape)}))
"""


def child(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where the weight files go (default: a fresh temp folder)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import machine

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        child(WRITE, folder, args.dtype, json.dumps(STAGE_C), json.dumps(STAGE_B))
        sizes = json.loads((Path(folder) / "sizes.json").read_text())
        runs: dict[str, list[dict[str, float]]] = {"resident": [], "swapping": []}
        for _ in range(args.repeats):  # alternate the modes
            for mode in runs:
                runs[mode].append(json.loads(child(RUN, folder, mode, args.dtype, json.dumps(STAGE_C),
                                                   json.dumps(STAGE_B))))
    print(f"machine: {machine()}")
    print("\n### Weights (" + args.dtype + "): " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in sizes.items()))
    largest = max(sizes[k] for k in ("stage_c", "stage_b", "stage_a"))
    goal = 1.15 * (largest + sizes["text_encoder"])
    print(f"goal: peak above imports ≤ 1.15 × (largest stage + text encoder) = {goal / MiB:.0f} MiB\n")
    print("| mode | peak RSS MiB | above imports MiB | / (largest stage + text encoder) | run s |")
    print("|---|---|---|---|---|")
    for mode, results in runs.items():
        peak = statistics.median(r["peak"] for r in results)
        above = statistics.median(r["peak"] - r["base"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        print(f"| {mode} | {peak / MiB:.0f} | {above / MiB:.0f} | {above / (largest + sizes['text_encoder']):.2f} "
              f"| {seconds:.1f} |")
    print(f"\n(medians of {args.repeats} fresh processes per mode; all weights: "
          f"{sum(sizes.values()) / MiB:.0f} MiB)")


if __name__ == "__main__":
    main()
