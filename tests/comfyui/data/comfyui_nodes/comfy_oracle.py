"""Importing ComfyUI's reference tree in the oracle venv, for the one-off make_*.py scripts here."""

from __future__ import annotations

import sys


def boot_comfyui(tree: str = "/tmp/comfy") -> None:
    """Import ComfyUI on CPU in float32, model families the extracted tree lacks stubbed (never called here)."""
    import importlib.abc
    import importlib.machinery
    import types

    sys.argv = ["x", "--cpu", "--force-fp32"]
    sys.path.insert(0, tree)

    class Missing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
            if not name.startswith(("comfy.", "comfy_extras.", "comfy_api")):
                return None
            for finder in sys.meta_path:
                if finder is not self and getattr(finder, "find_spec", None):
                    try:
                        if finder.find_spec(name, path, target) is not None:
                            return None
                    except Exception:  # noqa: S112 - a finder that cannot answer
                        continue
            return importlib.machinery.ModuleSpec(name, self, is_package=True)

        def create_module(self, spec):  # type: ignore[no-untyped-def]
            module = types.ModuleType(spec.name)
            module.__path__, module.__file__ = [], "/missing/" + spec.name
            module.__getattr__ = lambda k: object  # type: ignore[method-assign]
            return module

        def exec_module(self, module):  # type: ignore[no-untyped-def]
            pass

    # torchvision's CPU-less wheel cannot register its C++ ops' fake kernels; its models need none of them
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision  # noqa: F401 - a stub in the oracle venv: give its modules a file name for inspect
        for name, module in list(sys.modules.items()):
            if name.startswith("torchvision"):
                module.__file__ = f"/stubs/{name}.py"
    except ImportError:
        pass
    sys.meta_path.append(Missing())
    import comfy.options

    comfy.options.enable_args_parsing()
