"""Benchmark: lean loading of a lite-sized (1B) bf16 Stage C against a plain read of the same file.

    .venv/bin/python benchmarks/load_stage_c.py [--dir /tmp/cascade_lab_bench] [--repeat 3] [--rewrite]

Writes a synthetic ``stage_c_lite_bf16.safetensors`` (official layout, random bf16 values, ~2.06 GB)
tensor by tensor — the model is only ever built on the meta device — then times, each in a fresh
subprocess so that peak RSS (VmHWM) is clean:

* ``plain_read``: read every byte of the file into one reused 64 MiB buffer (the I/O floor);
* ``lean_load``: ``cascade_lab.weights.load_stage("stage_c", path, dtype=torch.bfloat16)`` (the default:
  weights stored in bf16 become views of a private map of the file);
* ``lean_load_no_mmap``: the same with ``mmap=False`` (``readinto`` into freshly allocated tensors);
* ``load_file``: ``safetensors.torch.load_file`` + ``load_state_dict(assign=True)``, for comparison.

Times count from after the imports; "+touch" also reads one value per 4 KiB page of every weight, so
lazily mapped weights are really in memory (a fair comparison with the plain read).

Warm runs first read the file once so that all runs see the page cache; a cold run evicts the file with
``posix_fadvise(DONTNEED)`` (no root needed) before reading. Goals: peak RSS <= 1.15 x file + 0.5 GB,
lean time <= 1.5 x plain read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9

CHILD = r"""
import json, os, resource, sys, time
path, mode = sys.argv[1], sys.argv[2]

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

if mode == "cold":
    fd = os.open(path, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
    mode = sys.argv[3]
if mode != "plain_read":
    import torch
    from safetensors.torch import load_file
    from cascade_lab.weights import load_stage
    from cascade_lab.models.stage_c import StageCConfig
base = hwm()
t0 = time.perf_counter()
model = None
if mode == "plain_read":
    buf, total = bytearray(64 << 20), 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
elif mode in ("lean_load", "lean_load_no_mmap"):
    model = load_stage("stage_c", path, dtype=torch.bfloat16, mmap=mode == "lean_load")
elif mode == "load_file":
    with torch.device("meta"):
        model = StageCConfig.lite().build()
    model.load_state_dict(load_file(path), strict=True, assign=True)
loaded = time.perf_counter() - t0
if model is not None:  # make every weight resident: read one value per 4 KiB page
    with torch.no_grad():
        for p in model.parameters():
            p.view(-1)[:: 4096 // p.element_size()].float().sum()
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "loaded": loaded, "peak_rss": hwm(), "rss_before": base}))
"""


def write_synthetic(path: Path, seed: int = 0) -> int:
    """Stream a random bf16 Stage C lite in the official layout to ``path``; returns its size."""
    import torch

    from cascade_lab.models.stage_c import StageCConfig

    with torch.device("meta"):
        model = StageCConfig.lite().build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned, as safetensors does
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.rename(path)
    from safetensors import safe_open  # the reference reader must accept the file

    with safe_open(str(path), framework="pt") as sf:
        assert set(sf.keys()) == set(shapes)
        assert tuple(sf.get_tensor("clf.1.weight").shape) == shapes["clf.1.weight"]
    return path.stat().st_size


def run(path: Path, *mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), *mode], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/cascade_lab_bench")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rewrite", action="store_true")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    ap.add_argument("--keep", action="store_true", help="keep the 2 GB file afterwards")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stage_c_lite_bf16.safetensors"
    if args.rewrite or not path.exists():
        t0 = time.perf_counter()
        write_synthetic(path)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    size = path.stat().st_size
    print(f"file: {size / GB:.3f} GB ({size} bytes)")

    results: dict[str, dict] = {}
    run(path, "plain_read")  # warm the page cache
    for mode in ("plain_read", "lean_load", "lean_load_no_mmap", "load_file"):
        runs = [run(path, mode) for _ in range(args.repeat)]
        results[f"{mode} (warm)"] = {"seconds": statistics.median(r["seconds"] for r in runs),
                                     "loaded": statistics.median(r["loaded"] for r in runs),
                                     "peak_rss": max(r["peak_rss"] for r in runs),
                                     "rss_before": min(r["rss_before"] for r in runs)}
    if not args.no_cold:
        for mode in ("plain_read", "lean_load"):
            results[f"{mode} (cold)"] = run(path, "cold", mode)
    print(f"{'run':<26}{'load s':>8}{'+touch s':>10}{'peak RSS GB':>13}{'RSS before GB':>15}")
    for name, r in results.items():
        print(f"{name:<26}{r['loaded']:>8.2f}{r['seconds']:>10.2f}{r['peak_rss'] / GB:>13.3f}"
              f"{r['rss_before'] / GB:>15.3f}")
    lean, plain = results["lean_load (warm)"], results["plain_read (warm)"]
    rss_goal = 1.15 * size + 0.5 * GB
    print(f"goal peak RSS <= 1.15 x file + 0.5 GB = {rss_goal / GB:.3f} GB: "
          f"{'PASS' if lean['peak_rss'] <= rss_goal else 'FAIL'} ({lean['peak_rss'] / GB:.3f} GB)")
    print(f"goal time <= 1.5 x plain read (warm) = {1.5 * plain['seconds']:.2f} s: "
          f"{'PASS' if lean['seconds'] <= 1.5 * plain['seconds'] else 'FAIL'} ({lean['seconds']:.2f} s)")
    if "lean_load (cold)" in results:
        lc, pc = results["lean_load (cold)"], results["plain_read (cold)"]
        print(f"cold: lean {lc['seconds']:.2f} s vs plain {pc['seconds']:.2f} s "
              f"({lc['seconds'] / pc['seconds']:.2f}x)")
    print(json.dumps({"file_bytes": size, **results}))
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
