"""K-FAC / EK-FAC factors against explicit Fisher blocks (float64, atol 1e-10), the sampled
Fisher's determinism, activation reuse, config validation and save/load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ATOL, RTOL, lm_batch, make_lm
from torch import nn

from msif_lite.engine.capture import per_sequence_grads
from msif_lite.engine.factors import EKFACFactors, FactorConfig, KFACFactors
from msif_lite.engine.fit import fit_covariances, fit_eigenbasis, fit_ekfac, fit_lambda
from msif_lite.engine.layers import find_modules
from msif_lite.engine.tasks import ClassificationTask, LanguageModelingTask

EMP = FactorConfig(fisher="empirical", progress=False)


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=RTOL)


def fisher_block(model, task, batches, module):
    """Explicit per-sequence Fisher block F = (1/N) Σ_n vec(DW_n) vec(DW_n)ᵀ (row-major vec)."""
    g = torch.cat([per_sequence_grads(model, task, b, [module])[module.name] for b in batches])
    v = g.reshape(len(g), -1)
    return v.T @ v / len(g)


def test_kfac_exact_for_one_linear_layer_one_example():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    task = ClassificationTask()
    batch = (torch.randn(1, 4, dtype=torch.float64), torch.tensor([2]))
    (module,) = find_modules(model)
    kfac = fit_covariances(model, task, [batch], EMP)
    x = kfac.layers[0]
    close(torch.kron(x.S, x.A), fisher_block(model, task, [batch], module))


@pytest.mark.parametrize("which", ["mlp", "gpt_neox"])
def test_ekfac_lambda_is_diag_of_rotated_fisher_and_beats_kfac(which, mlp):
    if which == "mlp":
        model, task, batches = mlp.model, mlp.task, mlp.batches(4)
    else:
        model, task = make_lm("gpt_neox"), LanguageModelingTask()
        batches = [lm_batch([0, 1, 2], "left"), lm_batch([3, 4])]
    modules = find_modules(model)
    ekfac = fit_ekfac(model, task, batches, EMP)
    kfac = fit_covariances(model, task, batches, EMP)
    assert ekfac.n_sequences == sum(len(b[0]) if isinstance(b, tuple) else len(b)
                                    for b in batches)
    for m, f, k in zip(modules, ekfac.layers, kfac.layers):
        F = fisher_block(model, task, batches, m)
        Q = torch.kron(f.q_s, f.q_a)
        close(f.lam.reshape(-1), torch.diagonal(Q.T @ F @ Q))
        close(f.A(), k.A)
        close(f.S(), k.S)
        ek_err = torch.linalg.norm(F - Q @ torch.diag(f.lam.reshape(-1)) @ Q.T)
        k_err = torch.linalg.norm(F - torch.kron(k.S, k.A))
        assert ek_err <= k_err + 1e-12


def test_lambda_from_cached_activations_equals_second_pass(mlp):
    batches = mlp.batches(3)
    cached = fit_ekfac(mlp.model, mlp.task, batches, FactorConfig(progress=False))
    fresh = fit_ekfac(mlp.model, mlp.task, batches,
                      FactorConfig(progress=False, cache_activations_mb=0))
    for a, b in zip(cached.layers, fresh.layers):
        close(a.lam, b.lam)
    for t in ("covariance_s", "eigendecomposition_s", "lambda_s"):
        assert getattr(cached.timings, t) >= 0


def test_stages_compose_like_fit_ekfac(mlp):
    batches = mlp.batches(5)
    kfac = fit_covariances(mlp.model, mlp.task, batches, EMP)
    assert isinstance(kfac, KFACFactors) and kfac.fisher == "empirical"
    eig = fit_eigenbasis(kfac)
    assert isinstance(eig, EKFACFactors) and not eig.has_lambda
    full = fit_lambda(mlp.model, mlp.task, batches, eig, EMP)
    ref = fit_ekfac(mlp.model, mlp.task, batches, EMP)
    for a, b in zip(full.layers, ref.layers):
        close(a.lam, b.lam)
    assert full.module_names == ("0", "2") and full.shapes == ((6, 5), (3, 7))


def test_sampled_fisher_is_deterministic_and_recorded(lm_task):
    model = make_lm("gpt2")
    batches = [lm_batch([0, 1]), lm_batch([2, 3, 4])]
    cfg = FactorConfig(fisher="sampled", seed=3, progress=False)
    a = fit_ekfac(model, lm_task, batches, cfg)
    b = fit_ekfac(model, lm_task, batches, cfg)
    c = fit_ekfac(model, lm_task, batches, dataclasses.replace(cfg, seed=4))
    e = fit_ekfac(model, lm_task, batches, dataclasses.replace(cfg, fisher="empirical"))
    assert a.fisher == "sampled" and a.config.seed == 3 and e.fisher == "empirical"
    for x, y, z, w in zip(a.layers, b.layers, c.layers, e.layers):
        assert torch.equal(x.lam, y.lam) and torch.equal(x.q_s, y.q_s)
        assert not torch.allclose(x.lam, z.lam) and not torch.allclose(x.lam, w.lam)


def test_factor_dtype_and_max_batches(mlp):
    kfac = fit_covariances(mlp.model, mlp.task, mlp.batches(2),
                           FactorConfig(progress=False, factor_dtype="float32", max_batches=2))
    assert kfac.n_sequences == 4 and kfac.layers[0].A.dtype == torch.float32
    auto = fit_covariances(mlp.model.float(), mlp.task,
                           [(x.float(), y) for x, y in mlp.batches(5)], EMP)
    assert auto.layers[0].S.dtype == torch.float32


def test_config_validation_and_help():
    for bad in (dict(fisher="true"), dict(factor_dtype="half"), dict(max_batches=0),
                dict(cache_activations_mb=-1)):
        with pytest.raises(ValueError):
            FactorConfig(**bad)
    with pytest.raises(TypeError):
        FactorConfig(seed=1.5)
    assert "sampled" in FactorConfig.help()
    assert FactorConfig(include=["mlp"]).include == ("mlp",)  # hashable


def test_save_load_roundtrip(tmp_path, mlp):
    cfg = FactorConfig(progress=False)
    ekfac = fit_ekfac(mlp.model, mlp.task, mlp.batches(5), cfg)
    path = ekfac.save(tmp_path / "f.safetensors", mlp.model, "data-v1")
    loaded = EKFACFactors.load(path, mlp.model, FactorConfig(progress=True), "data-v1")
    assert loaded.module_names == ekfac.module_names and loaded.n_tokens == ekfac.n_tokens
    assert loaded.fisher == "sampled" and loaded.timings == ekfac.timings
    for a, b in zip(ekfac.layers, loaded.layers):
        assert torch.equal(a.lam, b.lam) and torch.equal(a.q_a, b.q_a)
    kfac = fit_covariances(mlp.model, mlp.task, mlp.batches(5), cfg)
    kfac.save(tmp_path / "k.safetensors", mlp.model, "data-v1")
    k2 = KFACFactors.load(tmp_path / "k.safetensors", mlp.model, cfg, "data-v1")
    assert torch.equal(k2.layers[1].S, kfac.layers[1].S)


def test_eigh_workers_change_nothing_and_float32_eigh_is_close(mlp):
    """eigh_workers only schedules the layers (bit-identical bases); eigh_dtype float32 gives
    the same bases and Λ to float32 round-off (rtol 1e-4 on Λ, the EK-FAC inverse's input)."""
    batches = mlp.batches(5)
    model = mlp.model.float()
    fbatches = [(x.float(), y) for x, y in batches]
    cfg = FactorConfig(fisher="empirical", progress=False, factor_dtype="float32")
    one = fit_ekfac(model, mlp.task, fbatches, dataclasses.replace(cfg, eigh_workers=1))
    two = fit_ekfac(model, mlp.task, fbatches, dataclasses.replace(cfg, eigh_workers=2))
    f32 = fit_ekfac(model, mlp.task, fbatches, dataclasses.replace(cfg, eigh_dtype="float32"))
    for a, b, c in zip(one.layers, two.layers, f32.layers):
        assert torch.equal(a.q_a, b.q_a) and torch.equal(a.q_s, b.q_s)
        assert torch.equal(a.lam, b.lam)
        # the same subspaces (eigenvectors up to sign): |Q64ᵀ Q32| ≈ I
        for q64, q32 in ((a.q_a, c.q_a), (a.q_s, c.q_s)):
            torch.testing.assert_close((q64.T @ q32).abs(), torch.eye(len(q64)), atol=1e-4,
                                       rtol=0)  # fmt: skip
        torch.testing.assert_close(c.lam, a.lam, rtol=1e-4, atol=1e-7)
    assert cfg.settings(["0"]) == dataclasses.replace(cfg, eigh_workers=3).settings(["0"])
    assert cfg.settings(["0"]) != dataclasses.replace(cfg, eigh_dtype="float32").settings(["0"])
    for bad in (dict(eigh_dtype="float16"), dict(eigh_workers=0)):
        with pytest.raises(ValueError, match="eigh_"):
            FactorConfig(**bad)


def test_fit_order_batches_by_length_unless_a_budget_takes_a_prefix(lm_task):
    """attribution.stage.fit_order: shortest to longest (stable) for the whole data, as given
    with batch_order='given' or under a token or batch budget; with the empirical Fisher (no
    label draws) the factors do not depend on the order (rtol 1e-10, float64)."""
    from conftest import PAD_ID, SEQUENCES

    from msif_lite.attribution.stage import fit_order
    from msif_lite.engine.gradstore import Candidate
    from msif_lite.engine.tasks import make_token_batch

    cands = [Candidate(f"d{i}", tuple(s), tuple(s)) for i, (s, _) in enumerate(SEQUENCES)]
    lengths = [len(c.input_ids) for c in cands]
    from msif_lite.attribution.config import AttributionConfig

    got = fit_order(cands, AttributionConfig(batch_order="length"))
    assert [len(c.input_ids) for c in got] == sorted(lengths) and got != cands
    for budget in (dict(max_tokens=4), dict(max_batches=1)):
        assert fit_order(cands, AttributionConfig(batch_order="length", factors=FactorConfig(
            **budget))) == cands  # fmt: skip
    assert fit_order(cands, AttributionConfig()) == cands  # the default: as given
    with pytest.raises(ValueError, match="batch_order"):
        AttributionConfig(batch_order="random")
    model = make_lm("gpt_neox")

    def batches(cs):
        return [make_token_batch([c.input_ids for c in cs[i:i + 2]], PAD_ID)
                for i in range(0, len(cs), 2)]

    a = fit_ekfac(model, lm_task, batches(cands), EMP)
    b = fit_ekfac(model, lm_task, batches(got), EMP)
    for x, y in zip(a.layers, b.layers):
        torch.testing.assert_close(y.A(), x.A(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(y.S(), x.S(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(y.lam, x.lam, rtol=1e-8, atol=1e-12)


def test_bf16_cache_holds_twice_the_tokens_and_lambda_stays_close(lm_task):
    """cache_dtype='bfloat16': a budget that holds 3/4 of the float32 captures holds all of
    them in bf16, so the Λ pass runs no second forward pass; Λ from the bf16-rounded (ā, Ds)
    stays within 1 % of the float32 Λ in norm (bf16 keeps 8 bits of mantissa; single entries
    near 0, where rotated terms cancel, move more), and the damped inverse the scores use,
    1/(Λ + λ) with λ = 0.1·mean Λ (the kit's default relative damping), within 3 % (2 % seen)."""
    import copy

    model = copy.deepcopy(make_lm("gpt_neox")).float()
    batches = [lm_batch([0, 1]), lm_batch([2, 3, 4])]
    base = FactorConfig(fisher="empirical", progress=False, factor_dtype="float32")
    cache: list = []
    fit_covariances(model, lm_task, batches, base, cache=cache)
    budget = 0.75 * sum(c.nbytes() for c in cache) / 2**20
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        f32 = fit_ekfac(model, lm_task, batches, dataclasses.replace(
            base, cache_activations_mb=budget))  # fmt: skip
        n32, forwards[:] = len(forwards), []
        b16 = fit_ekfac(model, lm_task, batches, dataclasses.replace(
            base, cache_activations_mb=budget, cache_dtype="bfloat16"))  # fmt: skip
        n16 = len(forwards)
    finally:
        hook.remove()
    assert n32 == 2 * len(batches) and n16 == len(batches)  # the second pass is gone
    for x, y in zip(f32.layers, b16.layers):
        assert torch.equal(x.q_a, y.q_a)  # A, S are accumulated before any rounding
        assert float((y.lam - x.lam).norm() / x.lam.norm()) < 1e-2
        lam = 0.1 * x.lam.mean()
        torch.testing.assert_close(1 / (y.lam + lam), 1 / (x.lam + lam), rtol=3e-2, atol=0)
    assert base.settings(["x"]) != dataclasses.replace(base, cache_dtype="bfloat16").settings(
        ["x"])
    with pytest.raises(ValueError, match="cache_dtype"):
        FactorConfig(cache_dtype="float16")
