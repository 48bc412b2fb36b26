"""Benchmarks: `msif-lite bench engine | accuracy | fact-tracing`.

Each writes `results/<name>.json` and a markdown table `results/<name>.md`, measures its
baseline in the same run, and records time and peak memory. `MSIF_FAST=1` shrinks sizes.
Speed is measured here, never in timed tests.
"""
