"""``python -m cascade_lab.training CONFIG.toml`` or ``python -m cascade_lab.training [SCRIPT.py] --kohya_flags``.

The entry for ``torchrun --nproc_per_node N -m cascade_lab.training ...`` and ``accelerate launch -m
cascade_lab.training ...``: one process per GPU, each running the same command.
"""

import sys

from .cli_entry import main

if __name__ == "__main__":
    sys.exit(main())
