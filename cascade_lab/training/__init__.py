"""Fine-tuning Stage C (or Stage B, ``stage="b"``): kohya datasets, cached latents/text, LoRA or full training,
samples, checkpoints.

Public surface: `TrainConfig` (all settings, from kwargs or a TOML file), `train(config, callback=, stop=)`
returning a `TrainingRun` (losses, validation losses, samples, checkpoint and output file, ``stop()``),
`TrainingEvent` (what a callback receives), `load_prompts` (kohya prompt files), `plan_memory` (does a
fine-tune fit per GPU) and `export_checkpoint` (a sharded FSDP checkpoint → the single file). Importing this package
does not import torch; `train` does.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, TrainConfig

_LAZY = {
    "train": ".run", "TrainingRun": ".run", "TrainingEvent": ".run", "NonFiniteLoss": ".loop",
    "load_prompts": ".sampling", "SamplePrompt": ".sampling", "LoraNetwork": ".lora_train",
    "plan_memory": ".memory_plan", "MemoryPlan": ".memory_plan", "export_checkpoint": ".export",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "LoraNetwork", "MemoryPlan", "NonFiniteLoss", "SamplePrompt", "TrainConfig",
           "TrainingEvent", "TrainingRun", "export_checkpoint", "load_prompts", "plan_memory", "train"]
