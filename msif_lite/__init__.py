"""msif-lite: a Jupyter-first kit for training-data attribution, from classical influence
functions to the multi-stage EK-FAC influence of arXiv 2505.05017.

Start with notebook 00; each module's docstring names the notebook that derives it.
"""

from msif_lite.config import cmp, cmp_table, describe_run, device, fast_mode, pick

__version__ = "0.1.0"
__all__ = ["cmp", "cmp_table", "describe_run", "device", "fast_mode", "pick", "__version__"]
