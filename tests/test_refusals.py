"""No silently wrong number: every input the kit refuses, and every cache key, on a tiny
world saved like the shipped one. Each case here failed (gave a silently wrong result or an
unactionable error) before the fix; the README's "What the kit refuses" table lists them."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_world import build_tiny_shipped, load_tiny

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.checks import check_same_architecture
from msif_lite.attribution.methods import ScoreSettings
from msif_lite.cli import main
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.ihvp import Damping
from msif_lite.scale.pairs import load_model_pair, read_texts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_shipped(tmp_path_factory.mktemp("refuse"))


def _att(s, cache, pt=None, ft=None, tok=None, docs=None, **cfg):
    docs = docs if docs is not None else [(d.doc_id, d.text) for d in s.world.documents[:24]]
    pairs = [(p.prompt, p.answer) for p in s.world.finetune_qa[:16]]
    factors = cfg.pop("factors", FactorConfig(max_batches=2))
    return Attributor(pt or s.pretrained, ft or s.finetuned, tok or s.tokenizer, docs, pairs,
                      AttributionConfig(cache_dir=str(cache), progress=False, factors=factors,
                                        **cfg), alpha=s.alpha)  # fmt: skip


def _scores(att, s, method="multi_stage"):
    return att.scores(method, s.world.queries[:2], att.doc_ids[:12])


@pytest.mark.parametrize("what", ["embedding", "buffer", "untracked_layer", "final_norm"])
def test_cache_is_refused_after_any_weight_or_buffer_changes(tiny, tmp_path, what):
    """Case 1: the factor and gradient caches are keyed by every parameter and buffer."""
    s = load_tiny(tiny)
    cache = tmp_path / "cache"
    mlp = FactorConfig(include="mlp", max_batches=2)
    before = _scores(_att(s, cache, factors=mlp), s)
    ft, pt = copy.deepcopy(s.finetuned), copy.deepcopy(s.pretrained)
    with torch.no_grad():
        if what == "embedding":
            pt.get_input_embeddings().weight.mul_(1.5)
        elif what == "buffer":
            buf = next(b for n, b in pt.named_buffers() if b.is_floating_point())
            buf.mul_(1.01)
        elif what == "untracked_layer":  # attention is not tracked with include="mlp"
            next(p for n, p in pt.named_parameters() if "attention" in n).mul_(2.0)
        else:
            next(p for n, p in pt.named_parameters() if "final_layer_norm" in n).mul_(1.5)
    reused = _scores(_att(s, cache, pt=pt, ft=ft, factors=mlp), s)
    clean = _scores(_att(s, tmp_path / "clean", pt=pt, ft=ft, factors=mlp), s)
    torch.testing.assert_close(reused, clean, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(reused, before), "the change must matter, or the test means nothing"


def test_batch_size_is_part_of_the_factor_key_under_sampled_labels(tiny, tmp_path):
    """Case 2: with sampled labels the draws depend on the batch size, so it keys the cache."""
    s = load_tiny(tiny)
    a1 = _scores(_att(s, tmp_path / "c", batch_size=1), s)
    a16 = _scores(_att(s, tmp_path / "c", batch_size=16), s)
    clean16 = _scores(_att(s, tmp_path / "clean", batch_size=16), s)
    # (float32 padding rounding between batch sizes: ~4e-6 relative; the label draws: ~10 %)
    torch.testing.assert_close(a16, clean16, rtol=1e-4, atol=1e-6 * float(clean16.abs().max()))
    assert not torch.allclose(a1, a16)
    # with the empirical Fisher (no draws) the batch size changes the factors only by float32
    # rounding of padded batches (measured: 4e-4 relative in the scores, vs ~10 % for draws)
    emp = FactorConfig(fisher="empirical", max_batches=None)
    e1 = _scores(_att(s, tmp_path / "e", batch_size=1, factors=emp), s)
    e16 = _scores(_att(s, tmp_path / "e2", batch_size=16, factors=emp), s)
    torch.testing.assert_close(e1, e16, rtol=2e-3, atol=1e-6 * float(e16.abs().max()))
    assert (a1 - a16).abs().max() > 10 * (e1 - e16).abs().max()


def test_same_shapes_other_config_is_refused(tiny):
    """Case 3: heads / RoPE θ change the function while every shape stays the same."""
    s = load_tiny(tiny)
    other = copy.deepcopy(s.finetuned)
    other.config.rotary_emb_base = 1234.0
    with pytest.raises(ValueError, match="rotary_emb_base"):
        check_same_architecture(s.pretrained, other)


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tiny, tmp_path):
    """Case 4: the tokenizer passed in is compared with the one saved beside the weights."""
    from msif_lite.world.generate import make_world
    from msif_lite.world.lm import train_tokenizer

    s = load_tiny(tiny)
    ft = type(s.finetuned).from_pretrained(str(tiny / "ckpt" / "finetuned"))
    other = train_tokenizer(make_world("ci-fast", seed=3))  # same size, other merges
    assert len(other) <= len(s.tokenizer)
    with pytest.raises(ValueError, match="saved in"):
        _att(s, tmp_path, ft=ft, tok=other)


def test_empty_documents_are_dropped_with_a_count(tiny, tmp_path):
    """Case 5."""
    s = load_tiny(tiny)
    docs = [(d.doc_id, d.text) for d in s.world.documents[:6]] + [("e1", ""), ("e2", "  \n")]
    with pytest.warns(UserWarning, match="dropped 2 empty"):
        att = _att(s, tmp_path, docs=docs)
    assert "e1" not in att.doc_ids and len(att.doc_ids) == 6


@pytest.mark.parametrize("prompt,answer", [("   ", "Lumora"), ("Question: x\nAnswer:", "<|pad|>"),
                                           ("Question: x\nAnswer:", "\u200b"),
                                           ("Question: x\nAnswer:", "<|endoftext|>")])
def test_empty_questions_and_special_token_answers_are_refused(tiny, tmp_path, prompt, answer):
    """Case 6, through the API for every kind of method."""
    from msif_lite.attribution.trace import TracedQuestion

    s = load_tiny(tiny)
    att = _att(s, tmp_path)
    for method in ("multi_stage", "bm25"):
        with pytest.raises(ValueError, match="empty|special tokens|invisible"):
            att.scores(method, [TracedQuestion(prompt, answer)], att.doc_ids[:3])


def test_text_baselines_see_the_answer(tiny, tmp_path):
    from msif_lite.attribution.trace import TracedQuestion

    s = load_tiny(tiny)
    att = _att(s, tmp_path)
    q = s.world.queries[0]
    with_a = att.scores("bm25", [q], att.doc_ids)
    other = att.scores("bm25", [TracedQuestion(q.prompt, "Zzyzx")], att.doc_ids)
    assert not torch.equal(with_a, other)
    torch.testing.assert_close(att.scores("bm25_question", [q], att.doc_ids),
                               att.scores("bm25_question", [TracedQuestion(q.prompt, "Zzyzx")],
                                          att.doc_ids))  # fmt: skip


def test_two_values_of_alpha_are_refused(tiny, tmp_path):
    """Case 7."""
    s = load_tiny(tiny)
    with pytest.raises(ValueError, match="two values of α"):
        Attributor(s.pretrained, s.finetuned, s.tokenizer, [("d", "text")], [("q", "a")],
                   AttributionConfig(alpha=1.0, cache_dir=str(tmp_path)), alpha=1e-3)


def test_nan_weights_are_refused_at_load_naming_the_parameter(tiny, tmp_path):
    """Case 8: the kit's checkpoints and a user's pair alike."""
    from msif_lite.world.lm import load_checkpoint

    s = load_tiny(tiny)
    bad = copy.deepcopy(s.finetuned)
    with torch.no_grad():
        bad.gpt_neox.final_layer_norm.weight[0] = float("nan")
    bad.save_pretrained(tmp_path / "bad")
    s.pretrained.save_pretrained(tmp_path / "good")
    with pytest.raises(ValueError, match="final_layer_norm.weight.*NaN"):
        load_model_pair(tmp_path / "good", tmp_path / "bad")
    ck = tmp_path / "ck"
    import shutil

    shutil.copytree(tiny / "ckpt" / "finetuned", ck)
    shutil.copy(tmp_path / "bad" / "model.safetensors", ck / "model.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        load_checkpoint(ck)


def test_a_corrupt_cache_file_is_recomputed_with_a_warning_naming_it(tiny, tmp_path):
    """Case 9: factors and candidate gradients."""
    s = load_tiny(tiny)
    ref = _scores(_att(s, tmp_path), s)
    for f in list((tmp_path / "factors").glob("*.safetensors"))[:1] + \
            list((tmp_path / "grads").rglob("*.safetensors"))[:1]:  # fmt: skip
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"\.safetensors was corrupt") as rec:
        again = _scores(_att(s, tmp_path), s)
    assert len(rec) >= 2
    torch.testing.assert_close(again, ref)


def test_corpus_files_name_the_problem(tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"good text\n\nbad \xff\xfe byte\n")
    with pytest.raises(ValueError, match=r"corpus.txt: invalid UTF-8 at byte 15.*errors='replace'"):
        read_texts(bad)
    assert read_texts(bad, errors="replace")[1].startswith("bad ")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no documents"):
        read_texts(empty)


@pytest.mark.parametrize("alpha,err", [(float("inf"), "finite"), (1e-30, "below"),
                                       ("0.01", "must be a number"), (True, "must be a number")])
def test_bad_alpha_names_alpha(alpha, err):
    with pytest.raises((ValueError, TypeError), match=err):
        ScoreSettings(alpha=alpha)
    with pytest.raises((ValueError, TypeError), match=err):
        AttributionConfig(alpha=alpha)


def test_damping_as_a_bare_number_is_accepted_and_fisher_checked_at_construction():
    assert AttributionConfig(pretrain_damping=1e-4).pretrain_damping == Damping(absolute=1e-4)
    with pytest.raises(TypeError, match="a number .λ. or a Damping"):
        AttributionConfig(pretrain_damping="small")
    with pytest.raises(ValueError, match="fisher must be"):
        FactorConfig(fisher="exact")
    with pytest.raises(ValueError, match="unknown curvature"):
        AttributionConfig(curvature="shampoo")


def test_cli_user_errors_are_one_line_that_names_the_fix(capsys):
    assert main(["trace", "Where?", "--preset", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "Shipped presets: default, lds" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["trace", "Where?", "--method", "nosuch"])
    assert "invalid choice" in capsys.readouterr().err


