"""One score, every consumer: for every registered method (and two curvatures), the scores
that `Attributor.scores`, the explorer's cached path and the fact-tracing benchmark's
in-memory path compute are the same numbers (`attribution.scoring.finish` is the only place
that applies a method's normalisation and layer mask). A copy of the score that drifts (a
normalisation dropped, a mask forgotten) fails here."""

from __future__ import annotations

import pytest
import torch
from helpers_world import build_tiny_shipped, load_tiny

from msif_lite.attribution import scoring
from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import METHODS, GradientMethod, Normalise, available
from msif_lite.bench import fact_tracing
from msif_lite.engine.factors import FactorConfig
from msif_lite.viz.explorer_data import ExplorerData, ExplorerQuery, Settings

REL = 1e-5  # float32 gradients, the same products summed in another order


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """max |got − want| ≤ REL · max |want| (scores span orders of magnitude, so an entrywise
    relative tolerance would test float32 round-off of the small ones, not the formula)."""
    err = float((got.double() - want.double()).abs().max()
                / want.double().abs().max().clamp_min(1e-300))
    assert got.shape == want.shape and err <= REL, f"{what}: relative error {err:.2e}"


@pytest.fixture(scope="module", params=["ekfac", "diagonal"])
def att(request, tmp_path_factory):
    root = build_tiny_shipped(tmp_path_factory.mktemp("path"))
    s = load_tiny(root)
    docs = [(d.doc_id, d.text) for d in s.world.documents[:24]]
    return Attributor(s.pretrained, s.finetuned, s.tokenizer, docs,
                      [(p.prompt, p.answer) for p in s.world.finetune_qa[:12]],
                      AttributionConfig(cache_dir=str(root / "cache"), progress=False,
                                        factors=FactorConfig(max_batches=2),
                                        curvature=request.param),
                      alpha=s.alpha, mentions={d: "Ludrur Draethund" for d, _ in docs})


QUESTIONS = [ExplorerQuery("Question: Where was Ludrur Draethund born?\nAnswer:", "Narvosk"),
             ExplorerQuery("Question: Where was Kexynd Lyzol born?\nAnswer:", "Lumora")]


def _methods(att) -> list[str]:
    return [n for n in available(att)]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_explorer_equals_attributor(att, name):
    if name not in _methods(att):
        pytest.skip(f"{name} needs {sorted(METHODS[name].requires() - att.provides)}")
    data = ExplorerData(att, QUESTIONS, n_candidates=None)
    docs = data.candidates(QUESTIONS[0])
    want = att.scores(name, QUESTIONS, docs)
    got = torch.stack([data.all_scores(q, Settings(name))[0] for q in QUESTIONS])
    assert_same(got, want, name)


def test_benchmark_equals_attributor(att, monkeypatch):
    """bench fact-tracing scores the dense gradient methods from its in-memory gradients
    (bfloat16 in the benchmark; float32 here, so the comparison is of the formula)."""
    monkeypatch.setattr(fact_tracing, "GRAD_DTYPE", torch.float32)
    docs = att.doc_ids[:16]
    got = fact_tracing.gradient_scores(att, QUESTIONS, docs, att.settings, {})
    got.pop("_grads")
    dense = {n for n, m in METHODS.items() if isinstance(m, GradientMethod) and m.dense_dot}
    assert set(got) == dense
    for name, layers in got.items():
        assert_same(torch.from_numpy(layers).sum(-1), att.scores(name, QUESTIONS, docs), name)


def test_every_normalisation_is_applied_by_each_consumer(att):
    """The two drifted copies of the score dropped RelatIF's normalisation; each
    normalisation changes the scores, so dropping one fails the tests above."""
    docs = att.doc_ids[:8]
    for norm in (Normalise.UNIT, Normalise.SELF_INFLUENCE):
        m = next(m for m in METHODS.values()
                 if isinstance(m, GradientMethod) and m.normalise is norm)  # fmt: skip
        s = scoring.normalisation(m, att, QUESTIONS, docs, att.settings)
        assert s is not None and s.shape == (len(QUESTIONS), len(docs))
        assert not torch.allclose(s, torch.ones_like(s))


def test_a_curvature_reaches_every_consumer_by_name(att):
    """The configured curvature (registered in its own file for 'diagonal') is what the
    methods' inverses use, with nothing but the config naming it."""
    inv = att.stage("pretrained").inverse(att.settings.pretrain_damping)
    assert inv.name == att.config.curvature
