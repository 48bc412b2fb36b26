"""Exp 2 (fact tracing): same as `msif-lite bench fact-tracing [args]`; MSIF_FAST=1 for CI."""
from msif_lite.bench.fact_tracing import main

raise SystemExit(main())
