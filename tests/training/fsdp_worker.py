"""Several `cascade-lab train CONFIG --strategy fsdp` runs in one torchrun launch (one process group, so the
tests pay the start of torch in 2 processes once): ``fsdp_worker.py A.toml [--copy SRC DST] B.toml ...``."""

from __future__ import annotations

import shutil
import sys

import torch.distributed as dist

from cascade_lab.cli import main


def run(argv: list[str]) -> int:
    dist.init_process_group("gloo")  # train() joins it and leaves it for the next run
    try:
        while argv:
            if argv[0] == "--copy":
                if dist.get_rank() == 0:
                    shutil.copytree(argv[1], argv[2])
                dist.barrier()
                argv = argv[3:]
                continue
            code = main(["train", argv.pop(0), "--quiet", "--strategy", "fsdp"])
            if code:
                return code
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
