"""Scaling to real checkpoints (notebook 09): loading model pairs and corpora, and the
memory planner."""
