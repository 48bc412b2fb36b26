"""Low-rank query gradients: exact at full rank, the SVD error formula, scores without DW."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP
from msif_lite.engine.layers import find_modules
from msif_lite.engine.lowrank import agreement, pairwise_scores_lowrank, relative_error, truncate
from msif_lite.engine.scores import pairwise_scores, precondition, query_gradients
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
    with pytest.raises(ValueError, match="by_module"):
        pairwise_scores(model, TASK, qg, batches, ihvp, mods, by_module=True, rank=2)
