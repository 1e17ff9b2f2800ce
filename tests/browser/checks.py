"""The checks of the browser suite, one function per thing a person sees; the tests call them on working
notebooks and, in test_negative.py, on deliberately broken ones, where each must fail.

Each check takes an open `Notebook` whose cells were written by the matching ``*_cells`` function, so a broken
variant is the same notebook with one cell changed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from typing import Any

from cascade_lab import read_png_params

from .lab import Notebook

PROMPT = "a red circle at the top left on a blue background"
LOAD = "%load_ext cascade_lab\n%cascade config variant=demo"
WIDGET_TIMEOUT_MS = 30_000


def _bytes(src: str) -> bytes:
    """The bytes of a ``data:`` URL (what JupyterLab and ipywidgets put in an <img>)."""
    head, _, payload = src.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), f"not a base64 data URL: {src[:60]!r}"
    return base64.b64decode(payload)


def _digest(src: str) -> str:
    """A short hash of an <img> source and its format, e.g. 'jpeg:3fa2…' (data: URLs are long)."""
    if not src.startswith("data:"):
        return f"url:{src[:40]}"
    kind = re.match(r"data:image/(\w+)", src)
    return f"{kind[1] if kind else '?'}:{hashlib.sha1(_bytes(src)).hexdigest()[:10]}"


# -- (a) a %%cascade cell ------------------------------------------------------------------------------------
def cascade_cells(*, preview_interval: float = 0) -> list[str]:
    """Load, a cell that generates (every Stage C step previews at interval 0), and one reading the result."""
    return [LOAD + f"\n%cascade config preview_interval={preview_interval:g}",
            f"%%cascade --seed 3 --steps-c 24 --steps-b 8 -o fox\n{PROMPT}",
            "print(fox.params.seed, fox.params.steps_c, fox.params.variant)"]


def check_cascade_cell(nb: Notebook) -> dict[str, Any]:
    """Cell 1 of `cascade_cells`: bars render and reach 100 %, ≥ 2 distinct previews in one place, then the PNG
    result replaces them and the caption carries the parameters. Returns what was recorded."""
    nb.run(0)
    nb.record(1)
    nb.run(1)
    log = nb.recorded()
    out = nb.output(1)
    frames = [_digest(src) for src in log["images"]]
    previews = [f for f in frames if f.startswith("jpeg:")]
    assert log["bars"], f"no progress bar rendered as a widget; the output shows: {nb.output_text(1)[:300]!r}"
    for name in ("Stage C", "Stage B"):
        assert log["bars"].get(name, 0) >= 100, f"progress bar {name!r} reached {log['bars'].get(name)} % " \
                                                f"(all bars: {log['bars']})"
    assert len(set(previews)) >= 2, f"the live preview showed {len(set(previews))} distinct frame(s): {frames}"
    assert log["maxImages"] == 1, f"{log['maxImages']} images at once: the preview was appended, not updated in place"
    images = out.locator(".jp-OutputArea-output img")
    assert images.count() == 1, f"{images.count()} images after the run (want the result alone)"
    final = _digest(images.first.get_attribute("src") or "")
    assert final.startswith("png:") and final not in previews, f"the final image is {final}, not a new PNG"
    text = nb.output_text(1)
    assert re.search(r"seed 3 · demo · 128x128 · C \S+ 24 steps", text), f"no parameter caption in {text!r}"
    params = read_png_params(io.BytesIO(_bytes(images.first.get_attribute("src") or "")))  # type: ignore[arg-type]
    assert (params.prompt, params.seed, params.steps_c) == (PROMPT, 3, 24), f"the PNG carries {params}"
    nb.run(2)
    assert nb.output_text(2).strip() == "3 24 demo", nb.output_text(2)
    return log
