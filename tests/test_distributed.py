"""Data-parallel EK-FAC and sharded scores (msif_lite.engine.distributed): 2 gloo CPU processes give
the one-process factors and scores (float64, rtol 1e-10) on the tiny MLP and GPT-NeoX, with
uneven shards, an empty shard, empirical and sampled Fisher; mismatched modules raise.

One `torch.multiprocessing` start (fork where available: no re-import of torch/transformers)
runs every scenario; the parent computes the one-process references and compares."""

from __future__ import annotations

import dataclasses
import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import lm_batch, make_lm, make_mlp

from msif_lite.engine.distributed import (
    batch_seed,
    fit_ekfac_distributed,
    pairwise_scores_distributed,
    shard,
    shard_range,
)
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP
from msif_lite.engine.layers import find_modules
from msif_lite.engine.scores import pairwise_scores
from msif_lite.engine.tasks import LanguageModelingTask

WORLD = 2
DEADLINE_S = 50.0
FISHERS = ("empirical", "sampled")


def _cfg(fisher: str) -> FactorConfig:
    return FactorConfig(fisher=fisher, seed=7, progress=False)


def _mlp_case(size: int):
    s = make_mlp()
    return s.model, s.task, s.batches(size), s.modules, s.batches(5)[0], s.batches(size)


def _lm_case():
    model = make_lm("gpt_neox")
    batches = [lm_batch([0, 1]), lm_batch([2]), lm_batch([3, 4], padding_side="left")]
    cands = [lm_batch([0]), lm_batch([1, 2]), lm_batch([3, 4])]
    return model, LanguageModelingTask(), batches, find_modules(model), lm_batch([1, 3]), cands


CASES = {"mlp": lambda: _mlp_case(4), "lm": _lm_case, "empty": lambda: _mlp_case(10)}
# mlp: 3 batches (4, 4, 2) → shards of 1 and 2 batches; empty: 1 batch → rank 0 has none
# (of the fitting batches and of the candidate batches alike)


def _scores(fit, score, case, fisher: str):
    model, task, batches, modules, queries, cands = case
    factors = fit(model, task, batches, _cfg(fisher), modules)
    ihvp = EKFACIHVP(factors)
    return factors, score(model, task, queries, cands, ihvp, modules, by_module=True,
                          progress=False)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        res = {}
        for name, make in CASES.items():
            for fisher in FISHERS:
                res[name, fisher] = _scores(fit_ekfac_distributed, pairwise_scores_distributed,
                                            make(), fisher)
        model, task, batches, modules, _, _ = CASES["mlp"]()
        try:
            fit_ekfac_distributed(model, task, batches, _cfg("empirical"),
                                  modules if rank == 0 else modules[:1])
        except ValueError as e:
            res["mismatch"] = str(e)
        try:  # progress may differ across ranks, the seed may not
            cfg = dataclasses.replace(_cfg("sampled"), seed=rank, progress=rank == 0)
            fit_ekfac_distributed(model, task, batches, cfg, modules)
        except ValueError as e:
            res["config"] = str(e)
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    make_lm("gpt_neox")  # fork: the workers inherit the imported modules and the cached LM
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD,
                             join=False, start_method=method)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13 * max(scale, 1e-300))


def _ekfac_matrix(f) -> torch.Tensor:
    """(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ: basis-free (eigenvectors up to sign/rotation)."""
    q = torch.kron(f.q_s, f.q_a)
    return (q * f.lam.reshape(-1)) @ q.T


def _assert_same_factors(got, ref) -> None:
    assert got.module_names == ref.module_names
    assert (got.n_sequences, got.n_tokens, got.fisher) == (ref.n_sequences, ref.n_tokens,
                                                           ref.fisher)
    for g, r in zip(got.layers, ref.layers):
        for t in ("eig_a", "eig_s", "lam"):
            _close(getattr(g, t), getattr(r, t))
        _close(g.A(), r.A())
        _close(g.S(), r.S())
        _close(_ekfac_matrix(g), _ekfac_matrix(r))


@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(ranks, case, fisher):
    one = _scores(fit_ekfac_distributed, pairwise_scores_distributed, CASES[case](), fisher)
    for r in range(WORLD):
        factors, scores = ranks[r][case, fisher]
        _assert_same_factors(factors, one[0])
        _close(scores, one[1])
    for a, b in zip(ranks[0][case, fisher][0].layers, ranks[1][case, fisher][0].layers):
        for t in ("q_a", "eig_a", "q_s", "eig_s", "lam"):  # every rank returns the same factors
            assert torch.equal(getattr(a, t), getattr(b, t))


def test_mismatched_modules_or_config_raise_on_every_rank(ranks):
    for r in range(WORLD):
        assert "ranks [1] passed different modules" in ranks[r]["mismatch"]
        assert "ranks [1] passed different config" in ranks[r]["config"]


@pytest.mark.parametrize("fisher", FISHERS)
def test_one_process_fallback_is_fit_ekfac_with_batch_seeds(fisher):
    model, task, batches, modules, queries, cands = _mlp_case(3)
    got = fit_ekfac_distributed(model, task, batches, _cfg(fisher), modules)
    seeds = [batch_seed(7, i) for i in range(len(batches))]
    ref = fit_ekfac(model, task, batches, _cfg(fisher), modules, batch_seeds=seeds)
    for g, r in zip(got.layers, ref.layers):
        assert torch.equal(g.lam, r.lam) and torch.equal(g.q_a, r.q_a)
    ihvp = EKFACIHVP(got)
    assert torch.equal(pairwise_scores_distributed(model, task, queries, cands, ihvp, modules,
                                                   progress=False),
                       pairwise_scores(model, task, queries, cands, ihvp, modules,
                                       progress=False))


def test_sampled_labels_do_not_depend_on_batch_order():
    """Per-batch seeds: reversing the batches (and their seeds) gives the same factors."""
    model, task, batches, modules, _, _ = _mlp_case(3)
    cfg = _cfg("sampled")
    seeds = [batch_seed(7, i) for i in range(len(batches))]
    a = fit_ekfac(model, task, batches, cfg, modules, batch_seeds=seeds)
    b = fit_ekfac(model, task, batches[::-1], cfg, modules, batch_seeds=seeds[::-1])
    e = fit_ekfac(model, task, batches, dataclasses.replace(cfg, fisher="empirical"), modules)
    for x, y, z in zip(a.layers, b.layers, e.layers):
        _close(x.S(), y.S())
        assert not torch.allclose(x.S(), z.S())  # the sampled labels are really drawn


def test_shard_is_a_balanced_contiguous_partition():
    for n in range(7):
        for w in range(1, 5):
            parts = [shard_range(n, r, w) for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard("abcde", 1, 2) == ["c", "d", "e"] and shard([1], 0, 2) == []
    with pytest.raises(ValueError, match="rank"):
        shard_range(3, 2, 2)
    assert batch_seed(0, 1) != batch_seed(1, 0) and 0 <= batch_seed(-3, 5) < 2**63
