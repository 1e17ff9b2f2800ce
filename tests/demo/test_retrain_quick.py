"""The retraining recipe learns: `python -m cascade_lab.demo.train --quick` (a few hundred steps per part)
already beats chance clearly on the held-out prompts, and writes loadable weights and a report.

What a few hundred steps learn is the background the prompt names, drawn through Stage C, Stage B and
Stage A; the shape's colour and position need the full plan (its figures: README, "The offline demo")."""

from __future__ import annotations

import json
from pathlib import Path

from cascade_lab.demo.models import PARTS, fresh_stages, load_weights
from cascade_lab.demo.train import main

CHANCE = {"background": 1 / 8}


def test_quick_retrain_beats_chance(tmp_path: Path) -> None:
    out = tmp_path / "weights"
    assert main(["--out", str(out), "--quick", "--work", str(tmp_path / "work")]) == 0
    report = json.loads((out / "report.json").read_text())
    rates = report["hit_rates"]
    assert rates["background"] >= 5 * CHANCE["background"], rates
    assert set(rates) == {"colour", "shape_and_colour", "position", "background", "all"}
    assert report["eval_prompts"] >= 50 and set(report["seconds"]) >= {"stage_a", "encoder", "stage_c", "stage_b"}
    assert sorted(report["files"]) == sorted(f"{p}.safetensors" for p in PARTS)
    load_weights(fresh_stages(), out)  # the files load into the demo architecture
    # Stage C went through cascade_lab.training.train itself: its run folder has the exported file
    assert (tmp_path / "work" / "stage_c" / "stage_c_finetune.safetensors").is_file()
