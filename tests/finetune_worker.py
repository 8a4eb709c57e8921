"""Runs ``finetune`` from a params YAML file in its own process (for torchrun).

Usage: python finetune_worker.py PARAMS_YAML SHARDS OUT
"""

import logging
import sys

from socialmae.params import section
from socialmae.train.finetune import FinetuneParams, finetune

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    params_path, shards, out = sys.argv[1:4]
    finetune(section(FinetuneParams, params_path, "finetune"), "demo", shards, out)
