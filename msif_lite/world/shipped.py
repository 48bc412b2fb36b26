"""The kit's shipped world and checkpoints under `data/` (Notebook 05 trains them).

`load_shipped()` loads the fictional world, its tokenizer and the pre-trained and
fine-tuned checkpoints, checking that all four belong together (content hashes).
`MSIF_DATA` overrides the data directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from msif_lite.world.generate import World, load_world
from msif_lite.world.lm import CheckpointMeta, load_checkpoint, load_tokenizer

DATA_ENV = "MSIF_DATA"


TRAINED_CACHE = Path(".cache") / "trained"


def data_dir() -> Path:
    """`$MSIF_DATA`, else the repository's `data/` folder."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


@dataclass
class Shipped:
    """A world with its tokenizer and both training stages."""

    world: World
    tokenizer: object
    pretrained: nn.Module
    finetuned: nn.Module
    finetuned_meta: CheckpointMeta
    root: Path

    @property
    def alpha(self) -> float:
        """The proximity strength the fine-tune was trained with."""
        if self.finetuned_meta.alpha is None:
            raise ValueError(f"{self.root}: the fine-tuned checkpoint records no α")
        return float(self.finetuned_meta.alpha)


def load_shipped(
    preset: str = "default",
    *,
    world_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
) -> Shipped:
    """Load `data/world/<preset>` and `data/checkpoints/<preset>/{pretrained,finetuned}`.

    Either directory can be given explicitly (e.g. the output of `build_world_pipeline`).
    """
    wdir = Path(world_dir) if world_dir else data_dir() / "world" / preset
    cdir = Path(checkpoint_dir) if checkpoint_dir else data_dir() / "checkpoints" / preset
    for d, what in ((wdir, "world"), (cdir / "pretrained", "pre-trained checkpoint"),
                    (cdir / "finetuned", "fine-tuned checkpoint")):  # fmt: skip
        if not d.is_dir():
            have = sorted(x.name for x in (data_dir() / "checkpoints").glob("*") if x.is_dir())
            raise FileNotFoundError(
                f"no {what} at {d}. Shipped presets: {', '.join(have) or 'none'}. Pass one of "
                "them, the right directories (--world / --checkpoints), or build one with "
                f"`msif-lite world --preset {preset} --out DIR`."
            )
    world = load_world(wdir)
    tok = load_tokenizer(wdir / "tokenizer", expect_world=world)
    pt, _ = load_checkpoint(cdir / "pretrained", expect_world=world, expect_tokenizer=tok)
    ft, meta = load_checkpoint(cdir / "finetuned", expect_world=world, expect_tokenizer=tok)
    return Shipped(world, tok, pt, ft, meta, cdir)


def trained_pipeline(preset: str, cache: str | Path = TRAINED_CACHE) -> tuple[Path, Path]:
    """(world dir, checkpoint dir) of a pipeline preset; trains it once if nothing is there.

    Shipped presets come from `data/`. Others (e.g. `paper-toy`, the paper's Exp 1 shape,
    ~5 min on 2 CPU cores) are trained by `build_world_pipeline` into `<cache>/<preset>`:
    training is seeded and reproducible, and the result is moved into place only when
    complete, so an interrupted run leaves nothing that loads. `load_shipped` then checks
    that world, tokenizer and checkpoints belong together.
    """
    from msif_lite.world.training import PIPELINE_PRESETS, build_world_pipeline

    if (data_dir() / "checkpoints" / preset).is_dir():
        return data_dir() / "world" / preset, data_dir() / "checkpoints" / preset
    if preset not in PIPELINE_PRESETS:
        raise ValueError(f"no shipped checkpoints for {preset!r} and no pipeline preset of that "
                         f"name; use one of {sorted(PIPELINE_PRESETS)} or pass --checkpoints")
    root = Path(cache) / preset
    if not (root / "results.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=root.parent))
        try:
            print(f"training the {preset!r} pipeline once into {root} …", flush=True)
            build_world_pipeline(preset, tmp, scratch_baseline=False)
            shutil.rmtree(root, ignore_errors=True)  # a leftover without results.json
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "world", root / "checkpoints"
