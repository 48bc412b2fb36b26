"""Models, proximity fine-tuning, checkpoints and the end-to-end pipeline (Notebook 05)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from msif_lite.world.generate import load_world, make_world  # noqa: E402
from msif_lite.world.lm import (  # noqa: E402
    CheckpointMeta,
    ModelPreset,
    answer_accuracy,
    build_model,
    config_hash,
    load_checkpoint,
    load_tokenizer,
    relative_drift,
    save_checkpoint,
    tokenizer_hash,
    train_tokenizer,
)
from msif_lite.world.training import (  # noqa: E402
    TrainConfig,
    collate,
    encode_qa,
    finetune,
    main,
    pretrain,
    proximity_penalty,
    snapshot_params,
)

TINY = ModelPreset("tiny", "gpt-neox", n_layers=1, hidden=32, n_heads=2, intermediate=64)
TINY_BLOOM = ModelPreset("tiny-bloom", "bloom", n_layers=1, hidden=32, n_heads=2, intermediate=128)


@pytest.fixture(scope="module")
def world_and_tok(tmp_path_factory):
    world = make_world("ci-fast", 0)
    tok = train_tokenizer(world, tmp_path_factory.mktemp("tok"))
    return world, tok


def _meta(model, world, tok, preset="tiny", stage="pretrained"):
    return CheckpointMeta(
        preset,
        0,
        stage,
        None,
        world.content_hash,
        tokenizer_hash(tok),
        config_hash(model.config),
        world.preset,
    )


def test_proximity_penalty_gradient_is_alpha_times_displacement():
    model = build_model(TINY, 50, seed=0).double()
    ref = {
        n: p.detach().clone() for n, p in build_model(TINY, 50, seed=1).double().named_parameters()
    }
    alpha = 0.37
    model.zero_grad()
    proximity_penalty(model, ref, alpha).backward()
    for n, p in model.named_parameters():
        expected = alpha * (p.detach() - ref[n])
        assert torch.allclose(p.grad, expected, rtol=1e-12, atol=1e-15), n
    value = proximity_penalty(model, ref, alpha).item()
    direct = (
        0.5
        * alpha
        * sum(((p.detach() - ref[n]) ** 2).sum().item() for n, p in model.named_parameters())
    )
    assert value == pytest.approx(direct, rel=1e-12)
    assert proximity_penalty(model, snapshot_params(model), alpha).item() == 0.0


def test_answer_only_labels_mask_prompt_and_padding(world_and_tok):
    world, tok = world_and_tok
    pairs = world.finetune_qa[:3]
    enc = encode_qa(tok, pairs)
    for qa, (ids, labels) in zip(pairs, enc):
        n_prompt = len(tok(qa.prompt, add_special_tokens=False)["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt:-1]).strip() == qa.answer
    ids, mask, labels = collate(enc, tok.pad_token_id)
    assert ((labels != -100) <= (mask == 1)).all()  # padding never carries loss
    assert (ids[mask == 0] == tok.pad_token_id).all()


@pytest.mark.parametrize("preset", [TINY, TINY_BLOOM], ids=["gpt-neox", "bloom"])
def test_checkpoint_reloads_bit_identically(tmp_path, world_and_tok, preset):
    world, tok = world_and_tok
    model = build_model(preset, len(tok), seed=0, tokenizer=tok)
    pretrain(model, tok, world, TrainConfig(steps=2, batch_size=4, warmup=1, progress=False))
    save_checkpoint(model, tmp_path / "ck", _meta(model, world, tok, preset.name), tok)
    back, meta = load_checkpoint(
        tmp_path / "ck", expect_world=world, expect_preset=preset, expect_tokenizer=tok
    )
    assert meta.stage == "pretrained" and meta.data_hash == world.content_hash
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == torch.float32 and torch.equal(sd[k], sd2[k]), k


def test_checkpoint_with_different_config_or_data_is_refused(tmp_path, world_and_tok):
    world, tok = world_and_tok
    model = build_model(TINY, len(tok), seed=0, tokenizer=tok)
    save_checkpoint(model, tmp_path / "ck", _meta(model, world, tok), tok)
    other = replace(TINY, name="wider", hidden=64)
    with pytest.raises(ValueError, match="expect_preset='tiny'|retrain"):
        load_checkpoint(tmp_path / "ck", expect_preset=other)
    with pytest.raises(ValueError, match="build_world_pipeline"):
        load_checkpoint(tmp_path / "ck", expect_world=make_world("ci-fast", 1))
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 96
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config"):
        load_checkpoint(tmp_path / "ck")


def test_tokenizer_from_another_corpus_is_refused(world_and_tok, tmp_path):
    world, tok = world_and_tok
    other_world = make_world("ci-fast", 5)
    model = build_model(TINY, len(tok), seed=0, tokenizer=tok)
    with pytest.raises(ValueError, match="train_tokenizer"):
        pretrain(model, tok, other_world, TrainConfig(steps=1, progress=False))
    other_tok = train_tokenizer(other_world)
    save_checkpoint(model, tmp_path / "ck", _meta(model, world, tok), tok)
    with pytest.raises(ValueError, match="tokenizer"):
        load_checkpoint(tmp_path / "ck", expect_tokenizer=other_tok)


def test_finetune_stays_close_and_accuracy_is_a_fraction(world_and_tok):
    world, tok = world_and_tok
    model = build_model(TINY, len(tok), seed=0, tokenizer=tok)
    ref = snapshot_params(model)
    res = finetune(
        model,
        ref,
        tok,
        world.finetune_qa,
        TrainConfig(steps=3, batch_size=8, warmup=1, progress=False),
        alpha=0.5,
    )
    assert len(res.losses) == 3 and all(p >= 0 for p in res.penalties)
    assert res.penalties[0] == 0.0
    acc = answer_accuracy(model, tok, world.queries[:10])
    assert 0.0 <= acc <= 1.0


def test_training_is_reproducible_from_seeds(world_and_tok):
    world, tok = world_and_tok
    cfg = TrainConfig(steps=3, batch_size=8, warmup=1, progress=False)
    runs = []
    for _ in range(2):
        model = build_model(TINY, len(tok), seed=7, tokenizer=tok)
        res = pretrain(model, tok, world, cfg)
        runs.append((res.losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_train_config_validation_names_the_setting():
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="n_heads"):
        ModelPreset("x", "gpt-neox", hidden=30, n_heads=4)


@pytest.mark.slow
def test_ci_fast_pipeline_end_to_end_via_cli(tmp_path):
    argv = ["--preset", "ci-fast", "--out", str(tmp_path), "--pretrain-steps", "250",
            "--finetune-steps", "40", "--no-progress"]  # fmt: skip
    s = main(argv)
    for key in ("finetuned_accuracy", "scratch_accuracy", "relative_drift", "chance_accuracy"):
        assert key in s
    assert s["preset"] == "ci-fast" and s["pretrain_steps"] == 250
    assert s["relative_drift"] < 0.08
    assert json.loads((tmp_path / "results.json").read_text()) == s
    world = load_world(tmp_path / "world")
    tok = load_tokenizer(tmp_path / "world" / "tokenizer", expect_world=world)
    for stage in ("pretrained", "finetuned"):
        ckpt = tmp_path / "checkpoints" / stage
        _, meta = load_checkpoint(
            ckpt, expect_world=world, expect_preset="ci-fast", expect_tokenizer=tok
        )
        assert meta.stage == stage
    assert (tmp_path / "losses.png").exists() and (tmp_path / "losses.json").exists()


SHIPPED = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.skipif(
    not (SHIPPED / "checkpoints" / "default" / "finetuned").exists(), reason="not shipped yet"
)
def test_shipped_default_checkpoints_know_their_world():
    world = load_world(SHIPPED / "world" / "default")
    tok = load_tokenizer(SHIPPED / "world" / "default" / "tokenizer", expect_world=world)
    ck = SHIPPED / "checkpoints" / "default"
    pre, meta_pt = load_checkpoint(ck / "pretrained", expect_world=world, expect_tokenizer=tok)
    ft, meta_ft = load_checkpoint(ck / "finetuned", expect_world=world, expect_tokenizer=tok)
    assert (meta_pt.stage, meta_ft.stage) == ("pretrained", "finetuned")
    assert relative_drift(ft, pre) <= 0.08
    assert answer_accuracy(ft, tok, world.queries) >= 0.5


def test_trained_pipeline_trains_once_and_never_leaves_a_partial_run(tmp_path, monkeypatch):
    """A preset without shipped checkpoints is trained into the cache once; a failure mid-way
    leaves nothing behind, so the next call trains again instead of loading half a run."""
    import msif_lite.world.training as training
    from msif_lite.world import shipped

    monkeypatch.setenv("MSIF_DATA", str(tmp_path / "data"))  # nothing shipped here
    calls = []

    def fake_build(preset, out, scratch_baseline=True):
        calls.append(preset)
        (Path(out) / "world").mkdir(parents=True)
        (Path(out) / "checkpoints").mkdir()
        if len(calls) == 1:
            raise KeyboardInterrupt  # interrupted before results.json is written
        (Path(out) / "results.json").write_text("{}")

    monkeypatch.setattr(training, "build_world_pipeline", fake_build)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        shipped.trained_pipeline("paper-toy", cache)
    assert list(cache.iterdir()) == []  # no partial run left
    w, c = shipped.trained_pipeline("paper-toy", cache)
    assert (w, c) == (cache / "paper-toy" / "world", cache / "paper-toy" / "checkpoints")
    assert shipped.trained_pipeline("paper-toy", cache) == (w, c) and len(calls) == 2
    with pytest.raises(ValueError, match="pipeline preset"):
        shipped.trained_pipeline("no-such-preset", cache)
