"""Runs ``pretrain`` from a params YAML file in its own process (for kill/resume and torchrun).

Usage: python pretrain_worker.py PARAMS_YAML SHARDS OUT
"""

import logging
import sys

from socialmae.params import section
from socialmae.train.pretrain import PretrainParams, pretrain

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    params_path, shards, out = sys.argv[1:4]
    pretrain(section(PretrainParams, params_path, "pretrain"), shards, out)
