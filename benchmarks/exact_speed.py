"""Seconds per exact GGN-vector product, before/after (msif_lite/bench/exact_speed.py)."""
import sys

from msif_lite.bench.exact_speed import main

sys.exit(main(sys.argv[1:]))
