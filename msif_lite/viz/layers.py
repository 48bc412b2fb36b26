"""How the views name and colour tracked layers (one copy for the plots and the explorer)."""

from __future__ import annotations

import re

GROUP_COLOURS = {"attention": "#ff7f0e", "mlp": "#2ca02c", "other": "#7f7f7f"}
TRUE_COLOUR = "#d62728"
_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


def layer_of(module_name: str) -> str:
    """'gpt_neox.layers.3.mlp.dense_h_to_4h' → '3' (the first number in the name)."""
    m = _LAYER_NUMBER.search(module_name)
    return m.group(1) if m else "other"
