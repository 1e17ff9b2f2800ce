"""Start-up: ``import cascade_lab``, ``%load_ext cascade_lab`` and ``%%cascade`` to its first preview (issue 8).

Every measurement runs in a fresh Python process (timed inside it, so interpreter start-up is excluded)
and the table gives medians:

* ``import cascade_lab`` (and whether torch / transformers got imported);
* ``%load_ext cascade_lab`` on a fresh IPython shell, cascade_lab not yet imported (so it includes the
  import, the plugin discovery and the magics' registration);
* ``%%cascade`` to the first Stage C preview on the ``tiny`` variant (offline, random weights), 1024²:
  the first cell of a session pays for importing torch and building the models; a second cell in the
  same process shows the warm time. Measured from the ``run_cell_magic`` call to the end of the first
  ``LiveProgress`` preview (the JPEG put on the display). ``import torch`` alone is given for scale.

    .venv/bin/python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT = r"""
import json, sys, time
t0 = time.perf_counter()
import cascade_lab
t = time.perf_counter() - t0
print(json.dumps({"s": t, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""

TORCH = r"""
import json, time
t0 = time.perf_counter()
import torch
print(json.dumps({"s": time.perf_counter() - t0}))
"""

LOAD_EXT = r"""
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance(history_length=0)
t0 = time.perf_counter()
shell.run_line_magic("load_ext", "cascade_lab")
t = time.perf_counter() - t0
print(json.dumps({"s": t, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""

FIRST_PREVIEW = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance(history_length=0)
shell.run_line_magic("load_ext", "cascade_lab")
shell.run_line_magic("cascade", "config variant=tiny preview_interval=0")
from cascade_lab.notebook import display as display_module
seen = []
show = display_module.LiveProgress._show_preview
def timed(self, x0):
    show(self, x0)
    seen.append(time.perf_counter())
display_module.LiveProgress._show_preview = timed
out = {}
for run in ("first", "second"):
    seen.clear()
    t0 = time.perf_counter()
    shell.run_cell_magic("cascade", "--seed 1", "a lighthouse at dusk\n")
    out[run] = seen[0] - t0
    out[run + "_total"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def child(code: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    runs: dict[str, list[dict[str, float]]] = {"import": [], "load_ext": [], "torch": [], "preview": []}
    codes = {"import": IMPORT, "load_ext": LOAD_EXT, "torch": TORCH, "preview": FIRST_PREVIEW}
    for _ in range(repeats):  # alternate, so load changes hit every measurement alike
        for name, code in codes.items():
            runs[name].append(child(code))

    def med(name: str, key: str = "s") -> float:
        return statistics.median(r[key] for r in runs[name])

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import machine

    print(f"machine: {machine()}\n")
    print(f"### Start-up, medians of {repeats} fresh processes\n")
    print("| step | median s | range s | imports torch? | goal |")
    print("|---|---|---|---|---|")
    for name, label in (("import", "`import cascade_lab`"), ("load_ext", "`%load_ext cascade_lab` (incl. import)")):
        values = [r["s"] for r in runs[name]]
        torch_seen = "yes" if any(r["torch"] for r in runs[name]) else "no"
        print(f"| {label} | {med(name):.3f} | {min(values):.3f}–{max(values):.3f} | {torch_seen} | ≤ 0.3 s, no torch |")
    values = [r["s"] for r in runs["torch"]]
    print(f"| `import torch` (for scale) | {med('torch'):.2f} | {min(values):.2f}–{max(values):.2f} | | |")
    for key, label in (("first", "first `%%cascade` → first preview (tiny, 1024²)"),
                       ("second", "second `%%cascade` → first preview (models loaded)")):
        values = [r[key] for r in runs["preview"]]
        print(f"| {label} | {med('preview', key):.2f} | {min(values):.2f}–{max(values):.2f} | | |")
    print(f"\n(whole first cell: {med('preview', 'first_total'):.2f} s; second: "
          f"{med('preview', 'second_total'):.2f} s)")


if __name__ == "__main__":
    main()
