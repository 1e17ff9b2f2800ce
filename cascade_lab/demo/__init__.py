"""The ``demo`` cascade: Stable Cascade at a small size, trained by cascade_lab on a synthetic world.

`world` draws the scenes and captions, `checker` reads them back from pixels, `models` builds the cascade
from the shipped weights, `train` retrains it (``python -m cascade_lab.demo.train --out DIR``) and
`evaluate` measures the hit rate over held-out prompts. Importing this package imports no torch.

The demo has a canny ControlNet of its own (`models.DemoControlNet`, ``weights/controlnet_canny.safetensors``),
trained on the frozen cascade by ``python -m cascade_lab.demo.train_controlnet --out DIR``: with
``Cascade("demo").generate(prompt, controls=[Control("canny", image)])`` the shape is drawn where the image's
outline is, whatever position the prompt names (`evaluate.evaluate_control` measures how often).
"""
