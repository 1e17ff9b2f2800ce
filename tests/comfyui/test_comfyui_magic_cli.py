"""``cascade-lab comfyui run/check`` and ``%cascade comfyui run``: a workflow of image and mask nodes (no models, no
tokenizer) runs, writes ComfyUI-named PNGs carrying the workflow, and a bad workflow is one message, no file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from IPython.core.error import UsageError
from PIL import Image

from cascade_lab import cli
from cascade_lab.comfyui import read_workflow


def workflow(tmp_path: Path) -> tuple[Path, Path]:
    """An API-form workflow: LoadImage → ImageScale → SaveImage, with its input folder."""
    (tmp_path / "input").mkdir()
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :15] = 255
    Image.fromarray(pixels).save(tmp_path / "input" / "half.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "half.png", "upload": "image"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                     "width": 60, "height": 40, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "scaled"}},
    }
    path = tmp_path / "scale.api.json"
    path.write_text(json.dumps(graph))
    return path, tmp_path / "input"


def test_cli_runs_a_workflow_into_comfyuis_file_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, inputs = workflow(tmp_path)
    out = tmp_path / "out"
    argv = ["comfyui", "run", str(path), "-o", str(out), "--input", str(inputs), "--models", str(tmp_path)]
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--set", "2.width=30", "--set", "2.height=20"]) == 0  # numbered after the first
    assert sorted(p.name for p in out.iterdir()) == ["scaled_00001_.png", "scaled_00002_.png"]
    with Image.open(out / "scaled_00001_.png") as png:
        assert png.size == (60, 40) and np.asarray(png)[0, 29].tolist() == [255, 255, 255]
    with Image.open(out / "scaled_00002_.png") as png:
        assert png.size == (30, 20)
    graph, _ = read_workflow(out / "scaled_00002_.png")  # the PNG carries the workflow as it ran
    assert graph["2"]["inputs"]["width"] == 30
    assert f"node 3: {out / 'scaled_00001_.png'}" in capsys.readouterr().out


def test_cli_check_and_errors_exit_2_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, inputs = workflow(tmp_path)
    assert cli.main(["comfyui", "check", str(path), "--input", str(inputs), "--models", str(tmp_path)]) == 0
    assert "3 nodes, ready to run" in capsys.readouterr().out
    bad = json.loads(path.read_text())
    bad["2"]["class_type"] = "ImageResize+"
    path.write_text(json.dumps(bad))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["comfyui", "run", str(path), "-o", str(out), "--input", str(inputs), "--models", str(tmp_path)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("cascade-lab comfyui run: error: this workflow uses 1 node type(s)")
    assert "node 2 ImageResize+: replace it by the built-in ImageScale" in err
    with pytest.raises(SystemExit):
        cli.main(["comfyui", "run", str(path), "-o", str(out), "--set", "seed=1"])
    assert "write NODE.INPUT=VALUE" in capsys.readouterr().err


def test_magic_runs_a_workflow_and_shows_each_output(ip: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, inputs = workflow(tmp_path)
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", f"comfyui run {path} --input {inputs} --models {tmp_path} --set 2.width=90 "
                                 "--as scaled")
    outputs = ip.user_ns["_comfyui"]
    assert ip.user_ns["scaled"] is outputs and outputs["3"].images[0].size == (90, 40)
    assert "node 3 SaveImage" in capsys.readouterr().out
    assert not list(tmp_path.glob("**/scaled_*.png"))  # no -o: nothing written
    with pytest.raises(UsageError, match="node 9 does not exist|no node 9"):
        ip.run_line_magic("cascade", f"comfyui run {path} --input {inputs} --models {tmp_path} --set 9.width=1")
    with pytest.raises(UsageError, match="%cascade comfyui: write %cascade comfyui run FILE"):
        ip.run_line_magic("cascade", "comfyui go")


def test_save_image_keeps_alpha_and_stays_in_the_output_folder(tmp_path: Path) -> None:
    from cascade_lab.comfyui import WorkflowError, run

    path, inputs = workflow(tmp_path)
    graph = json.loads(path.read_text())
    graph["4"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["2", 0], "alpha": ["1", 1]}}
    graph["3"]["inputs"] = {"images": ["4", 0], "filename_prefix": "sub/rgba"}
    out = run(graph, models=tmp_path, input_dir=inputs, output_dir=tmp_path / "out")
    with Image.open(out.files["3"][0]) as png:
        assert out.files["3"][0] == tmp_path / "out" / "sub" / "rgba_00001_.png"
        assert png.mode == "RGBA" and np.asarray(png)[..., 3].min() == 255  # no alpha in the input: opaque
    graph["3"]["inputs"]["filename_prefix"] = "../../escape"
    with pytest.raises(WorkflowError, match="points outside the output folder"):
        run(graph, models=tmp_path, input_dir=inputs, output_dir=tmp_path / "out")
    assert not (tmp_path.parent / "escape_00001_.png").exists()
