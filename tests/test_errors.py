"""Every bad input gets a clear error (one test each), never a silently wrong number."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_lm, make_mlp

from msif_lite.engine.capture import per_sequence_grads
from msif_lite.engine.factors import EKFACFactors, FactorConfig
from msif_lite.engine.fit import fit_covariances, fit_eigenbasis, fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP, KFACIHVP, Damping
from msif_lite.engine.layers import find_modules
from msif_lite.engine.scores import pairwise_scores, query_gradients
from msif_lite.engine.storage import StaleArtifactError
from msif_lite.engine.tasks import LanguageModelingTask, make_token_batch

CFG = FactorConfig(progress=False)


def test_token_ids_outside_vocab_tokenizer_mismatch():
    model = make_lm("gpt_neox")
    batch = make_token_batch([[3, 4, 60]], pad_id=0)  # vocab is 50
    with pytest.raises(ValueError, match="outside the model's vocabulary.*tokenizer"):
        per_sequence_grads(model, LanguageModelingTask(), batch, find_modules(model))


def test_factors_fitted_on_another_model_are_refused(tmp_path):
    a, b = make_mlp(seed=0), make_mlp(seed=1)
    ekfac = fit_ekfac(a.model, a.task, a.batches(5), CFG)
    path = ekfac.save(tmp_path / "ekfac.safetensors", a.model, "data")
    with pytest.raises(StaleArtifactError, match="another model"):
        EKFACFactors.load(path, b.model, CFG, "data")
    with pytest.raises(StaleArtifactError, match="different settings"):
        EKFACFactors.load(path, a.model, FactorConfig(fisher="empirical"), "data")
    with pytest.raises(StaleArtifactError, match="different dataset"):
        EKFACFactors.load(path, a.model, CFG, "other data")


def test_query_without_answer_tokens():
    model = make_lm("gpt2")
    q = make_token_batch([[5, 6, 7]], 0, target_masks=[[False, False, False]])
    with pytest.raises(ValueError, match="no answer tokens"):
        query_gradients(model, LanguageModelingTask(), q, find_modules(model))


def test_nan_in_factors_names_the_layer():
    m = make_mlp()
    x = m.x.clone()
    x[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        fit_covariances(m.model, m.task, [(x, m.y)], CFG)
    ekfac = fit_ekfac(m.model, m.task, m.batches(5), CFG)
    bad = EKFACFactors(
        (ekfac.layers[0], type(ekfac.layers[1])(**{**ekfac.layers[1].__dict__,
                                                   "lam": ekfac.layers[1].lam * float("nan")})),
        ekfac.fisher, ekfac.n_sequences, ekfac.n_tokens, ekfac.config,
    )
    with pytest.raises(FloatingPointError, match="'2'"):
        EKFACIHVP(bad)


def test_nan_in_gradients():
    m = make_mlp()
    model = copy.deepcopy(m.model)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        per_sequence_grads(model, m.task, (m.x, m.y), find_modules(model))


def test_empty_candidate_set():
    m = make_mlp()
    ihvp = EKFACIHVP(fit_ekfac(m.model, m.task, m.batches(5), CFG))
    with pytest.raises(ValueError, match="candidate set is empty"):
        pairwise_scores(m.model, m.task, (m.x[:2], m.y[:2]), [], ihvp, m.modules,
                        progress=False)


def test_zero_damping_on_singular_block():
    m = make_mlp(n=2)  # 2 examples: A (5x5) and Λ are singular
    ekfac = fit_ekfac(m.model, m.task, [(m.x, m.y)], CFG)
    with pytest.raises(ValueError, match=r"singular.*Damping\(absolute=\.\.\.\) > 0"):
        EKFACIHVP(ekfac, Damping(absolute=0.0))
    with pytest.raises(ValueError, match="singular"):
        KFACIHVP(ekfac, Damping(absolute=0.0))
    EKFACIHVP(ekfac, Damping())  # the heuristic works


def test_vectors_for_other_layers_than_the_factors():
    m = make_mlp()
    ihvp = EKFACIHVP(fit_ekfac(m.model, m.task, m.batches(5), CFG, modules=m.modules[:1]))
    grads = per_sequence_grads(m.model, m.task, (m.x, m.y), m.modules)
    with pytest.raises(ValueError, match="fitted for"):
        ihvp.apply(grads)


def test_ekfac_ihvp_needs_lambda():
    m = make_mlp()
    eig = fit_eigenbasis(fit_covariances(m.model, m.task, m.batches(5), CFG))
    with pytest.raises(ValueError, match="fit_ekfac"):
        EKFACIHVP(eig)


def test_empty_loader_and_bad_damping():
    m = make_mlp()
    with pytest.raises(ValueError, match="no batches"):
        fit_covariances(m.model, m.task, [], CFG)
    with pytest.raises(ValueError, match="absolute"):
        Damping(absolute=-1.0)

