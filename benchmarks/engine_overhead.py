"""Engine overhead: same as `msif-lite bench engine [args]`; MSIF_FAST=1 for CI."""
from msif_lite.bench.engine import main

raise SystemExit(main())
