"""Built-in plugins: the shipped samplers, schedulers and weight variants (no torch at import)."""
