"""Shared tiny float64 fixtures for the curvature-engine tests.

- `mlp`: a 2-layer MLP (4 → 6 → 3, tanh) with a ClassificationTask and 10 examples;
- `make_lm(arch)`: tiny GPT-NeoX / BLOOM / GPT-2 (Conv1D) causal LMs, vocab 50, hidden 16,
  2 layers, dropout off, float64, built from transformers configs (no downloads);
- `SEQUENCES` / `lm_batch(...)`: a few token sequences with prompt tokens (labels = -100),
  padded right or left.

BLOOM + left padding is not used: BLOOM's eager attention softmaxes in float32, where a
float64 mask minimum becomes -inf, so fully padded query rows give NaN (a transformers
limitation, not ours; the engine then raises a FloatingPointError).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one intra-op thread is ~10x faster than two on a busy 2-core machine
# (no OpenMP spin-waiting for a core another process holds).
torch.set_num_threads(1)

from msif_lite.engine.layers import TrackedModule, find_modules  # noqa: E402
from msif_lite.engine.tasks import (  # noqa: E402
    ClassificationTask,
    LanguageModelingTask,
    TokenBatch,
    make_token_batch,
)

ATOL = 1e-10  # float64 agreement for quantities computed two ways
RTOL = 1e-8
LM_ARCHS = ("gpt_neox", "bloom", "gpt2")
PAD_ID = 0

# (tokens, target mask): the first tokens of some sequences are a prompt (no loss)
SEQUENCES: list[tuple[list[int], list[bool]]] = [
    ([5, 9, 12, 7, 3, 44], [False, False, False, True, True, True]),
    ([17, 2, 31], [False, True, True]),
    ([8, 8, 21, 40, 11, 6, 29, 13], [False] * 3 + [True] * 5),
    ([49, 1, 26, 33], [False, True, True, True]),
    ([14, 22], [False, True]),
]


@dataclass
class MLPSetup:
    model: nn.Module
    task: ClassificationTask
    x: torch.Tensor
    y: torch.Tensor
    modules: list[TrackedModule]

    def batches(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x[i : i + size], self.y[i : i + size]) for i in range(0, len(self.x), size)]


def make_mlp(seed: int = 0, n: int = 10) -> MLPSetup:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return MLPSetup(model, ClassificationTask(), x, y, find_modules(model))


@pytest.fixture
def mlp() -> MLPSetup:
    return make_mlp()


@cache
def _build_lm(arch: str, seed: int) -> nn.Module:
    from transformers import (
        BloomConfig,
        BloomForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=50, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "gpt_neox":
            cfg = GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64,
                                hidden_dropout=0.0, attention_dropout=0.0, **common)
            model = GPTNeoXForCausalLM(cfg)
        elif arch == "bloom":
            cfg = BloomConfig(hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0.0,
                              attention_dropout=0.0, **common)
            model = BloomForCausalLM(cfg)
        elif arch == "gpt2":
            cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, **common)
            model = GPT2LMHeadModel(cfg)
        else:
            raise ValueError(arch)
    return model.double().eval()


def make_lm(arch: str, seed: int = 0) -> nn.Module:
    """A tiny float64 causal LM (cached per (arch, seed); do not modify its weights)."""
    return _build_lm(arch, seed)


def lm_batch(
    indices: list[int] | None = None, padding_side: str = "right", all_targets: bool = False
) -> TokenBatch:
    """Pad SEQUENCES[indices] into one TokenBatch (prompt tokens get labels = -100)."""
    chosen = [SEQUENCES[i] for i in (indices if indices is not None else range(len(SEQUENCES)))]
    masks = None if all_targets else [m for _, m in chosen]
    return make_token_batch([s for s, _ in chosen], PAD_ID, masks, padding_side=padding_side)


@pytest.fixture(params=LM_ARCHS)
def lm_arch(request) -> str:
    return request.param


@pytest.fixture
def lm_task() -> LanguageModelingTask:
    return LanguageModelingTask()


def pad_sides(arch: str) -> tuple[str, ...]:
    return ("right",) if arch == "bloom" else ("right", "left")


@pytest.fixture
def tiny_pipeline(monkeypatch, tmp_path):
    """A 6-person world, a 1-layer model and a few steps per stage, registered as the presets
    "lds-tiny" / "tiny" (the retraining benchmarks' tests: lds, variants, unrolled)."""
    from msif_lite.world import generate, lm, training
    from msif_lite.world.generate import WorldConfig

    monkeypatch.setitem(generate.WORLD_PRESETS, "lds-tiny",
                        WorldConfig(n_entities=6, docs_per_fact=2, vocab_size=300))
    monkeypatch.setitem(lm.MODEL_PRESETS, "tiny", lm.ModelPreset("tiny", "gpt-neox", 1, 32, 2,
                                                                 64, 128))  # fmt: skip
    preset = training.PipelinePreset("lds-tiny", "tiny",
                                     training.TrainConfig(steps=6, warmup=1, progress=False),
                                     training.TrainConfig(steps=3, warmup=1, progress=False))
    monkeypatch.setitem(training.PIPELINE_PRESETS, "lds-tiny", preset)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MSIF_DATA", str(tmp_path / "data"))
    return "lds-tiny"
