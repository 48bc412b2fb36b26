"""The unrolled methods in the registry (attribution.unrolled_methods, eval.training_run).

On a tiny pipeline trained by world.training (6 documents, 6 + 4 AdamW steps, clip and
weight decay on): `Attributor.scores("unrolled", …)` is −metagradient computed directly
(rtol 1e-5: the same float32 computation in other query blocks), in any document order;
`unrolled_finetune_only` with the identity curvature is ⟨dm/dθ_pt, ∇ℓ(z, θ_pt)⟩/λ with
∇ℓ(z) taken by plain autograd (rtol 1e-4); without a training run, or with one that did not
produce the models, the methods refuse clearly. The benchmark runs end to end on a tiny
pipeline (its fast mode's plumbing)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import available
from msif_lite.engine.ihvp import Damping
from msif_lite.engine.prompts import encode_document
from msif_lite.engine.tasks import LanguageModelingTask
from msif_lite.eval import unrolled as U
from msif_lite.eval import unrolled_lm as L
from msif_lite.eval.retraining import RetrainConfig
from msif_lite.eval.training_run import TrainingRun
from msif_lite.world import generate, lm
from msif_lite.world.training import TrainConfig, finetune, pretrain, qa_batch, snapshot_params

TINY_LM = dict(arch="gpt-neox", n_layers=1, hidden=8, n_heads=2, intermediate=16)
PT_CFG = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup=2, weight_decay=0.1,
                     grad_clip=0.8, progress=False)  # fmt: skip
FT_CFG = TrainConfig(steps=4, batch_size=2, lr=5e-3, warmup=1, grad_clip=1.9, progress=False)
ALPHA = 0.3
pytestmark = pytest.mark.filterwarnings("ignore:. holds no tokenizer files")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny run trained by world.training, and the TrainingRun that describes it."""
    world = generate.make_world("ci-fast", 0)
    tok = lm.train_tokenizer(world, tmp_path_factory.mktemp("tok"))
    docs, qa, queries = world.documents[:6], world.finetune_qa[:3], world.queries[:3]
    init = lm.build_model(lm.ModelPreset("unrolled-tiny", **TINY_LM), len(tok), 0, tok)
    model = copy.deepcopy(init)
    pretrain(model, tok, world, PT_CFG, texts=[d.text for d in docs])
    pt = copy.deepcopy(model)
    finetune(model, snapshot_params(pt), tok, qa, FT_CFG, ALPHA)
    run = TrainingRun(init, tok, [d.doc_id for d in docs], [d.text for d in docs], list(qa),
                      PT_CFG, FT_CFG, ALPHA, block=2, finetune_dtype=torch.float32)  # fmt: skip
    return SimpleNamespace(world=world, tok=tok, docs=docs, qa=qa, queries=queries, init=init,
                           pt=pt, ft=model, run=run, cache=tmp_path_factory.mktemp("msif"))


def _att(t, run="same", **cfg) -> Attributor:
    return Attributor(copy.deepcopy(t.pt), copy.deepcopy(t.ft), t.tok,
                      [(d.doc_id, d.text) for d in t.docs], [(p.prompt, p.answer) for p in t.qa],
                      AttributionConfig(cache_dir=str(t.cache), progress=False, batch_size=4,
                                        **cfg),
                      alpha=ALPHA, training_run=t.run if run == "same" else run)  # fmt: skip


def test_unrolled_scores_are_minus_the_metagradient(tiny):
    att = _att(tiny)
    assert "training_run" in att.provides and {"unrolled", "unrolled_finetune_only"} <= set(
        available(att))  # fmt: skip
    ids = att.doc_ids
    got = att.scores("unrolled", tiny.queries, ids)
    model = copy.deepcopy(tiny.init)
    problem = L.lm_two_stage(model, tiny.tok, [d.text for d in tiny.docs], tiny.qa, PT_CFG,
                             FT_CFG, ALPHA)  # fmt: skip
    measure = L.task_measure(model, LanguageModelingTask(), qa_batch(tiny.tok, tiny.queries))
    direct = -U.metagradient(problem, measure)
    assert got.dtype == torch.float64 and got.shape == (3, 6)
    torch.testing.assert_close(got, direct.double(), rtol=1e-5, atol=1e-7)
    # another document order: the same numbers in the columns of that order (memoised)
    rev = att.scores("unrolled", tiny.queries, ids[::-1])
    assert torch.equal(rev, got.flip(1))
    assert set(tiny.run.seconds) == {"pretrain_replay", "finetune_pass", "pretrain_pass"}
    # the default float64 fine-tune pass (no overflow, see eval.training_run): the same
    # derivative up to the float32 rounding of the replays
    run64 = TrainingRun(tiny.init, tiny.tok, tiny.run.doc_ids, tiny.run.texts, tiny.qa, PT_CFG,
                        FT_CFG, ALPHA)  # fmt: skip
    assert run64.finetune_dtype == torch.float64
    torch.testing.assert_close(-run64.metagradient(tiny.queries).double(), got, rtol=1e-3,
                               atol=1e-3 * float(got.abs().max()))  # fmt: skip


def _doc_grad(model: nn.Module, tok, text: str, names: list[str]) -> list[torch.Tensor]:
    """∇ℓ(z) of the token-sum loss of text + eos at `model`, for the named parameters."""
    ids, labels = encode_document(tok, text)
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    loss = nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), reduction="sum")
    params = dict(model.named_parameters())
    return torch.autograd.grad(loss, [params[n] for n in names])


def test_unrolled_finetune_only_is_exact_finetune_then_influence(tiny):
    lam = 0.5
    att = _att(tiny, curvature="identity", pretrain_damping=Damping(absolute=lam))
    got = att.scores("unrolled_finetune_only", tiny.queries, att.doc_ids)
    names = [n for m in att.modules for n, _ in m.parameters()]
    index = {n: j for j, n in enumerate(tiny.run.problem.names)}
    adj = tiny.run.finetune_adjoints(tiny.queries)  # the fine-tune's exact dm/dθ_pt
    model = copy.deepcopy(tiny.pt).train()
    want = torch.zeros(3, 6, dtype=torch.float64)
    for j, d in enumerate(tiny.docs):
        g = _doc_grad(model, tiny.tok, d.text, names)
        for i in range(3):
            want[i, j] = sum(float((a[index[n]] * x).sum()) for n, x in zip(names, g)
                             for a in [adj[i]]) / lam  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # exact dm/dθ_pt is not multi-stage's α(H_ft + αI)⁻¹∇m: the fine-tune did not converge
    assert not torch.allclose(got, att.scores("multi_stage", tiny.queries, att.doc_ids))


def test_unrolled_methods_refuse_without_or_with_another_run(tiny):
    att = _att(tiny, run=None)
    assert "training_run" not in att.provides
    assert not {"unrolled", "unrolled_finetune_only"} & set(available(att))
    for name in ("unrolled", "unrolled_finetune_only"):
        with pytest.raises(ValueError, match="training_run=TrainingRun"):
            att.scores(name, tiny.queries, att.doc_ids)
    other = TrainingRun(tiny.init, tiny.tok, tiny.run.doc_ids, tiny.run.texts, tiny.run.
                        finetune_pairs, PT_CFG.__class__(**{**PT_CFG.__dict__, "seed": 1}),
                        FT_CFG, ALPHA)  # fmt: skip
    with pytest.raises(ValueError, match="does not reproduce the pre-trained model"):
        _att(tiny, run=other).scores("unrolled", tiny.queries, att.doc_ids)
    with pytest.raises(ValueError, match="not in the training run"):
        tiny.run.columns(["no-such-document"])
    with pytest.raises(ValueError, match="unique"):
        TrainingRun(tiny.init, tiny.tok, ["a", "a"], ["x", "y"], [], PT_CFG, FT_CFG, ALPHA)


def test_bench_unrolled_end_to_end(tiny_pipeline, tmp_path, monkeypatch):
    from msif_lite.bench import unrolled as bench

    cfg = bench.UnrolledBenchConfig(RetrainConfig(tiny_pipeline, n_subsets=4, n_noise=2),
                                    n_queries=2, block=2, baselines=("multi_stage", "bm25"),
                                    removal_methods=("unrolled", "multi_stage"), fixed_order=2)
    monkeypatch.setattr(bench, "FAST", cfg)
    monkeypatch.setenv("MSIF_FAST", "1")
    out, cache = tmp_path / "results", tmp_path / "cache"
    res = bench.main(["--out", str(out), "--cache-dir", str(cache)])
    assert res.json_path == out / "unrolled.json"
    r = json.loads(res.json_path.read_text())["worlds"]["lds-tiny"]
    assert set(r["methods"]) == {"unrolled", "unrolled_finetune_only", "multi_stage", "bm25"}
    for v in r["methods"].values():
        assert -1 <= v["lds_mean"] <= 1 and len(v["lds_per_query"]) == 2
    assert {"unrolled", "true_sources", "none"} <= set(r["top_k_removal"])
    assert "dm_targets_linear" in r["top_k_removal"]["unrolled"]
    assert r["cost"]["method_s_per_query"]["unrolled"] > 0
    f = r["fixed_order"]  # 2 subsets replayed in the run's order, against the same retrained
    assert f["n_subsets"] == 2 and set(f["unrolled"]) == {"fixed_order", "reshuffled"}
    assert "noise ceiling" in (out / "unrolled.md").read_text().lower()
    assert (out / "unrolled.png").stat().st_size > 1000
    scores = (cache / "scores-lds-tiny.json").read_text()
    bench.main(["--out", str(out), "--cache-dir", str(cache)])  # resumes: nothing rescored
    assert (cache / "scores-lds-tiny.json").read_text() == scores
