"""The ``demo`` cascade: Stable Cascade at a small size, trained by cascade_lab on a synthetic world.

`world` draws the scenes and captions, `checker` reads them back from pixels, `models` builds the cascade
from the shipped weights, `train` retrains it (``python -m cascade_lab.demo.train --out DIR``) and
`evaluate` measures the hit rate over held-out prompts. Importing this package imports no torch.
"""
