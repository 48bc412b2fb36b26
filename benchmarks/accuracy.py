"""Experiment 1 (IHVP accuracy vs exact-GGN CG): same as `msif-lite bench accuracy`."""
import sys

from msif_lite.bench.accuracy import main

sys.exit(main(sys.argv[1:]))
