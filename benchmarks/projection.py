"""Projected vs dense candidate gradients: `python benchmarks/projection.py [--questions Q]
[--documents N] [--seeds S]` writes results/projection.json + .md
(see msif_lite/bench/projection.py).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from msif_lite.bench.projection import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
