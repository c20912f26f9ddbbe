"""`python -m qforge.train ...` = `qforge train ...`: the entry torchrun starts once per rank.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m qforge.train --config recipe.yaml
"""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
