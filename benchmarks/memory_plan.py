"""Memory plan vs measurement: `python benchmarks/memory_plan.py [--sizes small,medium,large]
[--archs llama,gpt2]` writes results/memory_plan.json + .md (see msif_lite/bench/memory_plan.py).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from msif_lite.bench.memory_plan import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
