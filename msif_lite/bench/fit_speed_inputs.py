"""The inputs of `msif-lite bench fit-speed` (msif_lite/bench/fit_speed.py): the kit variants
(`--kit-variant NAME:key=value,...` → FactorConfig overrides, validated), the default model
(the "cpu" pair's θ_pt, else the converted SmolLM2 folder), the token blocks cut from the
real-English corpus (written once for every process), and the names of the Linear modules
both tools track. No `BENCH`: `discover` skips this module."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from msif_lite.bench.common import display_path
from msif_lite.bench.peers.peer_io import write_blocks

FIXED = {"include": "mlp", "progress": False}  # every variant; the layers are --layers
RESERVED = ("include", "exclude", "progress", "fisher")


# ------------------------------------------------------------------ kit variants
@dataclass(frozen=True)
class Variant:
    """A named set of FactorConfig overrides (`--kit-variant NAME:key=value,...`)."""

    name: str
    overrides: dict

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items()) or "(defaults)"


def _value(text: str):
    """'none' → None, 'true'/'false' → bool, an int, a float, else the string."""
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def variant_config(overrides: dict):
    """`FactorConfig(include="mlp", progress=False, **overrides)`; a key that is not a
    FactorConfig field (or one the benchmark sets itself) fails, naming the fields."""
    from msif_lite.engine.factors import FactorConfig

    fields = [f.name for f in dataclasses.fields(FactorConfig)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ValueError(f"unknown FactorConfig field(s) {unknown}; FactorConfig's fields are: "
                         f"{', '.join(fields)}")  # fmt: skip
    fixed = [k for k in overrides if k in RESERVED]
    if fixed:
        raise ValueError(f"{fixed} are set by the benchmark for every variant (the layers: "
                         "--layers; the Fisher: --fisher); vary another FactorConfig field")
    return FactorConfig(**{**FIXED, **overrides})


def parse_variant(text: str) -> Variant:
    """`NAME:key=value,key=value` (`NAME:` for the defaults) → a Variant, validated against
    FactorConfig (ValueError naming the problem)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"--kit-variant {text!r}: expected NAME:key=value,key=value "
                         "(NAME: alone for the defaults)")  # fmt: skip
    overrides = {}
    for item in (s.strip() for s in rest.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--kit-variant {text!r}: {item!r} is not key=value")
        overrides[key.strip()] = _value(value.strip())
    try:
        variant_config(overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--kit-variant {text!r}: {e}") from e
    return Variant(name.strip(), overrides)


# ------------------------------------------------------------------ inputs
def default_model(world_dir: Path) -> Path:
    """The "cpu" pair's θ_pt if that pipeline was trained, else the converted SmolLM2 folder.
    The pair: `.cache/real_lm/pipeline-cpu-<key>` as `world.real_pipeline` keys it now, else
    the newest complete `pipeline-cpu-*` run on the same base model and the same data (a key
    also changes when a training setting gains a field; the weights stay the θ_pt the kit's
    "cpu" pair uses)."""
    from msif_lite.scale.real_lm import smollm2_folder
    from msif_lite.world.real_pipeline import CACHE, REAL_PRESETS, pipeline_key
    from msif_lite.world.real_text import load_real_world

    base = smollm2_folder()
    preset = REAL_PRESETS["cpu"]
    world = preset.world(load_real_world(world_dir))
    exact = Path(CACHE) / f"pipeline-cpu-{pipeline_key(preset, world, base, 0)}"
    others = sorted(Path(CACHE).glob("pipeline-cpu-*"), key=lambda d: d.stat().st_mtime,
                    reverse=True)  # fmt: skip
    for root in (exact, *others):
        pt = root / "checkpoints" / "pretrained"
        with contextlib.suppress(OSError, ValueError):
            res = json.loads((root / "results.json").read_text())
            if ((pt / "config.json").is_file() and res.get("status") == "complete"
                    and res.get("base") == base.name
                    and res.get("data_hash") == world.content_hash):  # fmt: skip
                return pt
    return base


def build_blocks(tokenizer, texts: Sequence[str], sequences: int, tokens: int
                 ) -> tuple[list[list[int]], dict]:  # fmt: skip
    """Each text tokenised (no special tokens) + eos, all concatenated, cut into `sequences`
    blocks of `tokens` ids (the corpus repeated if it is too short: `corpus_passes` > 1)."""
    if sequences < 1 or tokens < 2:
        raise ValueError(f"need sequences >= 1 and tokens >= 2, got {sequences}, {tokens}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to join the documents with")
    stream: list[int] = []
    for t in texts:
        stream += list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [eos]
    if not stream:
        raise ValueError("no text to cut into blocks")
    passes = math.ceil(sequences * tokens / len(stream))
    joined = stream * passes
    ids = [joined[i * tokens:(i + 1) * tokens] for i in range(sequences)]
    return ids, {"documents": len(texts), "corpus_tokens": len(stream), "corpus_passes": passes}


def write_inputs(model: Path, world_dir: Path, sequences: int, tokens: int, path: Path) -> dict:
    """The real corpus' blocks, tokenised with the model's tokenizer, into `path`."""
    from transformers import AutoTokenizer

    from msif_lite.world.real_text import load_real_world

    tok = AutoTokenizer.from_pretrained(str(model))
    world = load_real_world(world_dir)
    ids, source = build_blocks(tok, world.pretrain_texts(), sequences, tokens)
    source = {**source, "corpus": display_path(world_dir), "content_hash": world.content_hash}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    write_blocks(path, ids, pad_id=pad, eos_id=tok.eos_token_id, source=source)
    return source


def tracked_modules(model: Path, layers: str | None) -> tuple[list[str], dict]:
    """The names of the Linear modules `FactorConfig(include="mlp")` tracks (those matching
    `layers` too, if given), found on the model built on the meta device (no weights), and
    the model's description."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from msif_lite.engine.factors import FactorConfig
    from msif_lite.engine.layers import find_modules

    cfg = AutoConfig.from_pretrained(str(model))
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(cfg)
    fc = FactorConfig(**FIXED)
    mods = find_modules(net, fc.include, fc.exclude)
    if layers:
        mods = [m for m in mods if re.search(layers, m.name)]
        if not mods:
            raise ValueError(f"--layers {layers!r} matches none of the MLP layers")
    shapes: dict[str, int] = {}
    for m in mods:
        key = f"{m.name.rsplit('.', 1)[-1]} {m.in_features}→{m.out_features}"
        shapes[key] = shapes.get(key, 0) + 1
    desc = {"class": type(net).__name__, "model_type": cfg.model_type,
            "blocks": getattr(cfg, "num_hidden_layers", None),
            "parameters": sum(p.numel() for p in net.parameters()),
            "tracked": len(mods), "tracked_shapes": shapes}  # fmt: skip
    return [m.name for m in mods], desc
