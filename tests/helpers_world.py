"""A tiny world saved the way the shipped one is (ci-fast world + tokenizer, an untrained
ci-fast model and a slightly perturbed copy as its "fine-tune"), for tests that need
`load_shipped` without the real checkpoints (the same recipe as `tests/test_trace.py`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from msif_lite.world.generate import make_world
from msif_lite.world.lm import (
    CheckpointMeta,
    build_model,
    config_hash,
    save_checkpoint,
    tokenizer_hash,
)
from msif_lite.world.lm import train_tokenizer as make_tokenizer
from msif_lite.world.shipped import Shipped, load_shipped

TINY_ALPHA = 0.01


def build_tiny_shipped(root: str | Path) -> Path:
    """Write `<root>/world` and `<root>/ckpt/{pretrained,finetuned}`; returns `root`."""
    root = Path(root)
    world = make_world("ci-fast", seed=0)
    world.save(root / "world")
    tok = make_tokenizer(world, root / "world" / "tokenizer")
    torch.manual_seed(0)
    pt = build_model("ci-fast", len(tok), 0, tok)
    ft = copy.deepcopy(pt)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    meta = CheckpointMeta("ci-fast", 0, "pretrained", None, world.content_hash,
                          tokenizer_hash(tok), config_hash(pt.config), "ci-fast")  # fmt: skip
    save_checkpoint(pt, root / "ckpt" / "pretrained", meta, tok)
    meta_ft = CheckpointMeta("ci-fast", 0, "finetuned", TINY_ALPHA, world.content_hash,
                             tokenizer_hash(tok), config_hash(ft.config), "ci-fast")  # fmt: skip
    save_checkpoint(ft, root / "ckpt" / "finetuned", meta_ft, tok)
    return root


def load_tiny(root: str | Path) -> Shipped:
    """Load what `build_tiny_shipped(root)` wrote."""
    root = Path(root)
    return load_shipped(world_dir=root / "world", checkpoint_dir=root / "ckpt")


def explorer_notebook(tiny_root: str | Path, cache_dir: str | Path, k: int = 5):
    """A notebook that opens the explorer on the tiny world in one call (what a learner's
    Notebook 07 cell does), ending with a claim."""
    import nbformat

    tests_dir = Path(__file__).resolve().parent
    setup = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        f"sys.path.insert(0, {str(tests_dir)!r})\n"
        "from helpers_world import load_tiny\n"
        "from msif_lite.attribution.attributor import AttributionConfig\n"
        "from msif_lite.engine.factors import FactorConfig\n"
        "from msif_lite.viz.explorer import open_explorer\n"
        f"shipped = load_tiny({str(tiny_root)!r})\n"
        f"config = AttributionConfig(cache_dir={str(cache_dir)!r}, progress=False, "
        "factors=FactorConfig(max_batches=2))"
    )
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}  # fmt: skip
    nb.cells = [
        nbformat.v4.new_code_cell(setup),
        nbformat.v4.new_code_cell(
            f"explorer = open_explorer(shipped, config=config, candidates_k={k}, "
            "n_candidates=None)\nexplorer"
        ),
        nbformat.v4.new_code_cell("assert explorer.view.doc_ids, 'the explorer ranks documents'"),
    ]
    return nb
