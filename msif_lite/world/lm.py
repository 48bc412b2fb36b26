"""Small causal LMs for the kit's world: presets, tokenizer, checkpoints, evaluation.

Notebook 05 ("The kit's own world") trains these; Notebooks 06+ load the shipped
checkpoints under `data/checkpoints/<preset>/{pretrained,finetuned}`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from msif_lite.engine.layers import check_finite_parameters
from msif_lite.world.generate import Query, World

EOS, PAD = "<|endoftext|>", "<|pad|>"
TOKENIZER_META = "msif_tokenizer.json"
CHECKPOINT_META = "msif_meta.json"
ARCH_KEYS = (  # the config entries that define the architecture (hashed into checkpoints)
    "model_type",
    "vocab_size",
    "hidden_size",
    "n_layer",
    "num_hidden_layers",
    "n_head",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rotary_pct",
    "rotary_emb_base",
    "use_parallel_residual",
    "tie_word_embeddings",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "hidden_act",
)


# ---------------------------------------------------------------- model presets
@dataclass(frozen=True)
class ModelPreset:
    """Shape of a randomly initialised causal LM (Notebook 05, section 3)."""

    name: str = field(metadata={"help": "preset name recorded in checkpoints"})
    arch: str = field(metadata={"help": "'gpt-neox' (GPTNeoXForCausalLM) or 'bloom'"})
    n_layers: int = field(default=2, metadata={"help": "transformer blocks"})
    hidden: int = field(default=256, metadata={"help": "model width d"})
    n_heads: int = field(default=2, metadata={"help": "attention heads (must divide hidden)"})
    intermediate: int = field(default=1024, metadata={"help": "MLP width (bloom: fixed 4d)"})
    max_positions: int = field(default=128, metadata={"help": "longest sequence in tokens"})

    def __post_init__(self) -> None:
        if self.arch not in ("gpt-neox", "bloom"):
            raise ValueError(f"ModelPreset.arch={self.arch!r}: use 'gpt-neox' or 'bloom'")
        if self.hidden % self.n_heads:
            raise ValueError("ModelPreset.n_heads must divide ModelPreset.hidden")
        if self.arch == "bloom" and self.intermediate != 4 * self.hidden:
            raise ValueError(
                "bloom has a fixed 4*hidden MLP: set ModelPreset.intermediate=4*hidden"
            )
        if min(self.n_layers, self.hidden, self.max_positions) < 1:
            raise ValueError("ModelPreset sizes (n_layers, hidden, max_positions) must be >= 1")


MODEL_PRESETS: dict[str, ModelPreset] = {
    "gpt-neox-toy": ModelPreset("gpt-neox-toy", "gpt-neox", 2, 256, 2, 1024),  # the paper's toy
    "gpt-neox-mini": ModelPreset("gpt-neox-mini", "gpt-neox", 2, 128, 2, 512),  # CPU default
    "bloom-small": ModelPreset("bloom-small", "bloom", 2, 256, 4, 1024),
    "ci-fast": ModelPreset("ci-fast", "gpt-neox", 2, 128, 2, 512),
}


def model_config(preset: ModelPreset, vocab_size: int, pad_id: int = 0, eos_id: int = 0):
    """The `transformers` config for a preset (dropout off so gradients are deterministic)."""
    common = dict(
        vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id
    )
    if preset.arch == "gpt-neox":
        return GPTNeoXConfig(
            hidden_size=preset.hidden,
            num_hidden_layers=preset.n_layers,
            num_attention_heads=preset.n_heads,
            intermediate_size=preset.intermediate,
            max_position_embeddings=preset.max_positions,
            rotary_pct=0.25,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            tie_word_embeddings=False,
            **common,
        )
    return BloomConfig(
        hidden_size=preset.hidden,
        n_layer=preset.n_layers,
        n_head=preset.n_heads,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        **common,
    )


def config_hash(config) -> str:
    """sha256 of the architecture-defining config entries (`ARCH_KEYS`). Notebook 05 §6."""
    d = config.to_dict()
    arch = {k: d[k] for k in ARCH_KEYS if k in d}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()


def build_model(
    preset: str | ModelPreset, vocab_size: int, seed: int = 0, tokenizer=None
) -> PreTrainedModel:
    """Random-init causal LM of a preset, float32, seeded (Notebook 05, section 3)."""
    p = MODEL_PRESETS[preset] if isinstance(preset, str) else preset
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    torch.manual_seed(seed)
    cfg = model_config(p, vocab_size, pad, eos)
    cls = GPTNeoXForCausalLM if p.arch == "gpt-neox" else BloomForCausalLM
    return cls(cfg).float()


def n_params(model: torch.nn.Module) -> int:
    """Number of parameters, Σ_p numel(p) (Notebook 05 §3)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- tokenizer
def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's serialised vocabulary and merges. Notebook 05 §2."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def train_tokenizer(world: World, out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's corpus (Notebook 05, section 2).

    Saved with `save_pretrained` plus `msif_tokenizer.json` holding the corpus hash,
    so `AutoTokenizer.from_pretrained(dir)` loads it and `check_tokenizer` can verify it.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=world.config.vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = world.pretrain_texts() + [f"{q.prompt} {q.answer}" for q in world.finetune_qa]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS
    )
    fast.init_kwargs["msif_corpus_hash"] = world.content_hash
    if out_dir is not None:
        out = Path(out_dir)
        fast.save_pretrained(out)
        meta = {
            "corpus_hash": world.content_hash,
            "tokenizer_hash": tokenizer_hash(fast),
            "preset": world.preset,
            "seed": world.seed,
            "vocab_size": len(fast),
        }
        (out / TOKENIZER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return fast


def load_tokenizer(tok_dir: str | Path, expect_world: World | None = None):
    """`AutoTokenizer.from_pretrained(dir)` + the corpus-hash check. Notebook 05 §2."""
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    meta_path = Path(tok_dir) / TOKENIZER_META
    if meta_path.exists():
        tok.init_kwargs["msif_corpus_hash"] = json.loads(meta_path.read_text())["corpus_hash"]
    if expect_world is not None:
        check_tokenizer(tok, expect_world)
    return tok


def check_tokenizer(tokenizer, world: World) -> None:
    """Raise ValueError when the tokenizer was trained on another corpus. Notebook 05 §2."""
    got = tokenizer.init_kwargs.get("msif_corpus_hash")
    if got is None:
        raise ValueError(
            "tokenizer carries no corpus hash: build it with "
            "msif_lite.world.lm.train_tokenizer(world) "
            "or load it with msif_lite.world.lm.load_tokenizer(dir)"
        )
    if got != world.content_hash:
        raise ValueError(
            f"tokenizer was trained on corpus {got[:12]} but the world is "
            f"{world.content_hash[:12]} (preset {world.preset!r}, seed {world.seed}): "
            f"use the tokenizer saved beside that world, or retrain with train_tokenizer(world)"
        )


# ---------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class CheckpointMeta:
    """What `msif_meta.json` records beside the safetensors weights."""

    preset: str
    seed: int
    stage: str  # "pretrained" | "finetuned"
    alpha: float | None
    data_hash: str
    tokenizer_hash: str
    config_hash: str
    world_preset: str = ""


def save_checkpoint(
    model: PreTrainedModel, out_dir: str | Path, meta: CheckpointMeta, tokenizer=None
):
    """`save_pretrained` (float32 safetensors) + `msif_meta.json` (+ tokenizer). Notebook 05 §6."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / CHECKPOINT_META).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")
    return out


def load_checkpoint(
    ckpt_dir: str | Path,
    expect_world: World | None = None,
    expect_preset: str | ModelPreset | None = None,
    expect_tokenizer: PreTrainedTokenizerFast | None = None,
) -> tuple[PreTrainedModel, CheckpointMeta]:
    """Load a checkpoint; refuse (ValueError naming the fix) when hashes do not match.

    Checked: config.json against the recorded config hash, the world's content hash
    (`expect_world`), the preset's architecture (`expect_preset`), the tokenizer hash.
    """
    d = Path(ckpt_dir)
    if not (d / CHECKPOINT_META).exists():
        raise FileNotFoundError(f"{d}/{CHECKPOINT_META} missing: not an msif-lite checkpoint")
    meta = CheckpointMeta(**json.loads((d / CHECKPOINT_META).read_text()))
    config = AutoConfig.from_pretrained(str(d))  # check before touching the weights
    if config_hash(config) != meta.config_hash:
        raise ValueError(
            f"{d}/config.json does not match the config hash in {CHECKPOINT_META} "
            "(the config was edited): restore config.json or retrain the checkpoint"
        )
    cls = GPTNeoXForCausalLM if config.model_type == "gpt_neox" else BloomForCausalLM
    model = cls.from_pretrained(str(d), dtype=torch.float32)
    check_finite_parameters(model, str(d))
    if expect_preset is not None:
        p = MODEL_PRESETS[expect_preset] if isinstance(expect_preset, str) else expect_preset
        want = config_hash(
            model_config(
                p, model.config.vocab_size, model.config.pad_token_id, model.config.eos_token_id
            )
        )
        if want != meta.config_hash:
            raise ValueError(
                f"checkpoint {d} has a different config than model preset {p.name!r} "
                f"(it was trained as {meta.preset!r}): pass expect_preset={meta.preset!r} or "
                f"retrain with build_world_pipeline(...) for preset {p.name!r}"
            )
    if expect_world is not None and meta.data_hash != expect_world.content_hash:
        raise ValueError(
            f"checkpoint {d} was trained on data {meta.data_hash[:12]}, not on world "
            f"{expect_world.content_hash[:12]} (preset {expect_world.preset!r}, seed "
            f"{expect_world.seed}): load the matching world or retrain with build_world_pipeline"
        )
    if expect_tokenizer is not None and tokenizer_hash(expect_tokenizer) != meta.tokenizer_hash:
        raise ValueError(
            f"checkpoint {d} was trained with another tokenizer: use the tokenizer saved in {d} "
            "or beside its world (data/world/<preset>/tokenizer)"
        )
    return model.eval(), meta


def relative_drift(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """‖θ_ft − θ_pt‖ / ‖θ_pt‖ over all parameters (paper: ≤ 8%). Notebook 05, section 5."""
    ref = dict(reference.named_parameters())
    num = sum(
        ((p.detach() - ref[n].detach()) ** 2).sum().item() for n, p in model.named_parameters()
    )
    den = sum((p.detach() ** 2).sum().item() for p in reference.parameters())
    return (num / den) ** 0.5


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8
) -> list[str]:
    """Greedy-decode after each prompt, stopping at newline or eos; prompts of equal token
    length are batched together (no padding needed). Notebook 05 §6."""
    model.eval()
    dev = next(model.parameters()).device
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    for idx in by_len.values():
        x = torch.tensor([ids[i] for i in idx], device=dev)
        start = x.shape[1]
        for _ in range(max_new_tokens):
            nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
        for row, i in enumerate(idx):
            gen = [t for t in x[row, start:].tolist()]
            if tokenizer.eos_token_id in gen:
                gen = gen[: gen.index(tokenizer.eos_token_id)]
            out[i] = tokenizer.decode(gen).split("\n")[0].strip()
    return out


def answer_correct(model: PreTrainedModel, tokenizer, queries: Sequence[Query]) -> list[bool]:
    """Per query: is the greedy answer exactly q.answer? Notebook 05, section 6."""
    longest = max(
        len(tokenizer(" " + q.answer, add_special_tokens=False)["input_ids"]) for q in queries
    )
    preds = greedy_answers(model, tokenizer, [q.prompt for q in queries], longest + 1)
    return [p == q.answer.strip() for p, q in zip(preds, queries)]


def answer_accuracy(model: PreTrainedModel, tokenizer, queries: Sequence[Query]) -> float:
    """Exact-match accuracy of greedy answers: mean_q [decode(q.prompt) == q.answer].

    Notebook 05, section 6 (and every notebook that checks the model knows its facts).
    """
    return sum(answer_correct(model, tokenizer, queries)) / len(queries)
