"""The design contract: `cascade_lab.models` exposes every stage with the official constructor names."""

from __future__ import annotations

import inspect
import json

import pytest
from conftest import reference_dir


def test_models_package_exposes_the_contract() -> None:
    import cascade_lab.models as models

    for name in ("StageC", "StageB", "StageA", "EfficientNetEncoder", "Previewer", "ControlNet"):
        assert inspect.isclass(getattr(models, name)), name


@pytest.mark.parametrize("fixture", ["stage_c_tiny", "stage_b_tiny", "stage_a_tiny", "previewer", "effnet_encoder",
                                     "controlnet_tiny"])
def test_constructors_take_the_official_keyword_names(fixture: str) -> None:
    import cascade_lab.models as models

    config = json.loads((reference_dir("fixtures", fixture) / "config.json").read_text())
    cls = getattr(models, config["class"])
    params = inspect.signature(cls).parameters
    missing = [k for k in config["kwargs"] if k not in params]
    assert not missing, f"{cls.__name__} lacks official keyword(s) {missing}"
