"""``import cascade_lab`` and ``%load_ext cascade_lab`` stay light: no torch, well under a second."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import cascade_lab
t1 = time.perf_counter()
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
t2 = time.perf_counter()
shell.run_line_magic("load_ext", "cascade_lab")
from cascade_lab import plugins
plugins.registries()
t3 = time.perf_counter()
heavy = sorted(m for m in ("torch", "transformers", "diffusers", "safetensors", "matplotlib") if m in sys.modules)
print(json.dumps({"import": t1 - t0, "load_ext": t3 - t2, "heavy": heavy}))
"""


def test_import_and_load_ext_import_no_torch_and_are_fast() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"heavy modules imported: {report['heavy']}"
    assert report["import"] < 0.5, report
    assert report["load_ext"] < 0.5, report


def test_top_level_api_names_exist_without_torch() -> None:
    code = ("import sys, cascade_lab; assert callable(cascade_lab.generate) and callable(cascade_lab.train); "
            "assert cascade_lab.Cascade.__name__ == 'Cascade'; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
