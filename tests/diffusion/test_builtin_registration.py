"""The built-in sampler and scheduler plugins register lazily and resolve to cascade_lab.diffusion."""

from __future__ import annotations

import subprocess
import sys

from cascade_lab.builtins.samplers import SAMPLERS
from cascade_lab.builtins.schedulers import SCHEDULERS


def test_builtin_plugins_import_no_torch():
    code = ("import sys, cascade_lab.builtins.samplers, cascade_lab.builtins.schedulers; "
            "assert 'torch' not in sys.modules, 'torch imported by a built-in plugin'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_functions_resolve():
    from cascade_lab.diffusion import samplers, schedulers

    for s in SAMPLERS:
        assert s.fn.resolve() is getattr(samplers, f"sample_{s.name}")
        assert len(s.description) < 100
    for s in SCHEDULERS:
        assert s.fn.resolve() is getattr(schedulers, s.name)
