"""Low-rank query gradients: exact at full rank, the SVD error formula, scores without DW;
per-layer preconditioning equal to the dense path."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP, Damping
from msif_lite.engine.layers import find_modules
from msif_lite.engine.lowrank import agreement, pairwise_scores_lowrank, relative_error, truncate
from msif_lite.engine.scores import (
    layer_inverse,
    pairwise_scores,
    precondition,
    precondition_lowrank,
    preconditioned_queries,
    query_gradients,
)
from msif_lite.engine.tasks import LanguageModelingTask, TokenBatch

TASK = LanguageModelingTask()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=2,
                                         attention_dropout=0.0, hidden_dropout=0.0))
    model = model.double().eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randint(0, 300, (4, 12), generator=g)
        batches.append(TokenBatch(x, torch.ones_like(x), x.clone()))
    mods = find_modules(model)
    ihvp = EKFACIHVP(fit_ekfac(model, TASK, batches, FactorConfig(progress=False), mods))
    pre = precondition(query_gradients(model, TASK, batches[0], mods), ihvp)
    return model, batches, mods, ihvp, pre


def test_full_rank_is_exact(setup):
    model, batches, mods, ihvp, pre = setup
    full = pairwise_scores(model, TASK, pre, batches, ihvp, mods, progress=False,
                           preconditioned=True)  # fmt: skip
    low = truncate(pre, 10_000)
    assert float(relative_error(pre, low).max()) < 1e-12
    s = pairwise_scores_lowrank(model, TASK, low, batches, mods, progress=False)
    torch.testing.assert_close(s, full, rtol=1e-9, atol=1e-9)


def test_truncation_error_is_the_tail_of_the_spectrum(setup):
    *_, pre = setup
    name = next(iter(pre))
    low = truncate({name: pre[name]}, 3)
    sv = torch.linalg.svdvals(pre[name])
    want = (sv[:, 3:].pow(2).sum(-1) / sv.pow(2).sum(-1)).sqrt()
    torch.testing.assert_close(relative_error({name: pre[name]}, low), want)
    assert low.left[name].shape[-1] == 3 and low.nbytes() < pre[name].numel() * 8


def test_lowrank_option_of_pairwise_scores_and_agreement(setup):
    model, batches, mods, ihvp, pre = setup
    qg = query_gradients(model, TASK, batches[0], mods)
    full = pairwise_scores(model, TASK, qg, batches, ihvp, mods, progress=False)
    by_option = pairwise_scores(model, TASK, qg, batches, ihvp, mods, progress=False, rank=4)
    direct = pairwise_scores(model, TASK, truncate(pre, 4).dense(), batches, ihvp, mods,
                             progress=False, preconditioned=True)  # fmt: skip
    torch.testing.assert_close(by_option, direct, rtol=1e-8, atol=1e-9)
    a = agreement(full, by_option, k=5)
    assert set(a) == {"spearman", "relative_error", "top5_overlap"}
    assert a["spearman"] > 0.5 and 0 <= a["relative_error"] < 1
    assert agreement(full, full)["relative_error"] == 0.0
    with pytest.raises(ValueError, match="rank"):
        truncate(pre, 0)
    per_layer = pairwise_scores(model, TASK, qg, batches, ihvp, mods, progress=False, rank=4,
                                by_module=True)  # fmt: skip
    assert per_layer.shape == (*by_option.shape, len(mods))
    torch.testing.assert_close(per_layer.sum(-1), by_option, rtol=1e-10, atol=1e-12)
    low = truncate(pre, 4)
    torch.testing.assert_close(pairwise_scores(model, TASK, low, batches, ihvp, mods,
                                               progress=False, preconditioned=True),
                               by_option, rtol=1e-10, atol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match="preconditioned=True"):
        pairwise_scores(model, TASK, low, batches, ihvp, mods, progress=False)


class _Dense:
    """An inverse the kit cannot split by layer (like engine.exact's references)."""

    name = "dense"

    def __init__(self, inner):
        self.inner = inner

    def apply(self, vectors):
        return self.inner.apply(vectors)


@pytest.fixture(scope="module")
def multi(setup):
    model, batches, mods, ihvp, _ = setup
    ft = fit_ekfac(model, TASK, batches[1:], FactorConfig(progress=False), mods)
    from msif_lite.engine.multistage import MultiStageIHVP

    return MultiStageIHVP(EKFACIHVP(ft, Damping(absolute=0.3)), ihvp, 0.3)


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("which", ["ekfac", "multi_stage", "not block-diagonal"])
def test_layerwise_preconditioning_equals_dense(setup, multi, rank, which):
    """Per-layer preconditioning (and truncation) of the queries gives the dense path's scores
    (float64: rtol 1e-9, atol 1e-10) through every entry point of pairwise_scores."""
    model, batches, mods, ekfac, _ = setup
    ihvp = {"ekfac": ekfac, "multi_stage": multi, "not block-diagonal": _Dense(multi)}[which]
    assert (layer_inverse(ihvp, mods[0].name) is None) == (which == "not block-diagonal")
    qg = query_gradients(model, TASK, batches[0], mods)
    ref = precondition(qg, ihvp, layerwise=False)
    if rank is None:
        for got in (precondition(qg, ihvp),
                    preconditioned_queries(model, TASK, batches[0], mods, ihvp, batch_size=3)):
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-10)
    else:
        want = truncate(ref, rank).dense()
        for low in (precondition_lowrank(qg, ihvp, rank),
                    preconditioned_queries(model, TASK, batches[0], mods, ihvp, rank=rank)):
            for k, v in low.dense().items():
                torch.testing.assert_close(v, want[k], rtol=1e-9, atol=1e-10)
    kw = dict(progress=False, rank=rank)
    dense = pairwise_scores(model, TASK, batches[0], batches, ihvp, mods, layerwise=False, **kw)
    for queries in (batches[0], qg):
        got = pairwise_scores(model, TASK, queries, batches, ihvp, mods, **kw)
        torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-10)
