"""BLOOM-560m stage benchmark: time and memory, predicted vs measured.

    python benchmarks/bloom560m.py              # full shape on a GPU, reduced size on a CPU
    python benchmarks/bloom560m.py --size full  # force the full BLOOM-560m shape

Writes results/bloom560m.json and results/bloom560m.md (see msif_lite/bench/bloom560m.py).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from msif_lite.bench.bloom560m import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
