"""A researcher's own model pair, end to end: tiny Llama, GPT-2 (Conv1D), GPT-NeoX and BLOOM
pairs saved with `save_pretrained`, a corpus file with ids and a long document, fine-tuning
data as JSON lines → `load_model_pair` → scores → `msif-lite trace --pretrained …`, and the
README's "Using it on your own models" block executed as printed.

The pairs: a byte-level BPE tokenizer trained on the corpus (well under a second), a random
model of each architecture (hidden 32, 2 layers, context 64 tokens; BLOOM has no position
limit, so its tokenizer's model_max_length is 64), and its "fine-tune": the same weights
after 30 AdamW steps on the fine-tuning pairs, so the fine-tuned model has answers of its own.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.checks import context_length
from msif_lite.attribution.trace import as_questions, top_k
from msif_lite.cli import main
from msif_lite.engine.layers import find_modules
from msif_lite.engine.prompts import DEFAULT_TEMPLATE, encode_pairs
from msif_lite.scale.pairs import chunk_documents, load_model_pair, read_documents, read_pairs
from msif_lite.world.lm import greedy_answers

CONTEXT = 64
ARCHS = ("llama", "gpt2", "gpt_neox", "bloom")
DOCS = [
    ("ada-birth", "Ada Lovelace was born in London in 1815."),
    ("ada-work", "Ada Lovelace wrote notes on the Analytical Engine of Charles Babbage."),
    ("babbage", "Charles Babbage designed the Analytical Engine in London."),
    ("curie-birth", "Marie Curie was born in Warsaw and studied in Paris."),
    ("curie-work", "Marie Curie discovered polonium and radium with Pierre Curie."),
    ("turing", "Alan Turing was born in London and worked at Bletchley Park."),
    ("weather", "It rained in Warsaw for most of the spring that year."),
    ("long", " ".join(f"Paragraph {i}: the engine computed Bernoulli numbers for Ada and "
                      f"Charles in London." for i in range(12))),  # fmt: skip
]
PAIRS = [
    ("Where was Ada Lovelace born?", "London"),
    ("Where was Marie Curie born?", "Warsaw"),
    ("Where was Alan Turing born?", "London"),
    ("What did Marie Curie discover?", "radium"),
    ("What did Ada Lovelace write?", "notes"),
    ("Who designed the Analytical Engine?", "Charles Babbage"),
]


def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<pad>", model_max_length=CONTEXT)  # fmt: skip


def _model(arch: str, vocab: int, eos: int, pad: int):
    import transformers as tf

    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=eos, pad_token_id=pad)
    cfg = {
        "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                        **common),  # fmt: skip
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=CONTEXT,
                                      **common),  # fmt: skip
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=CONTEXT, **common),
        "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=2, **common),
    }[arch]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg)


def _finetune(model, tok, steps: int = 30):
    """A few AdamW steps on the fine-tuning pairs, encoded with the kit's template."""
    from msif_lite.engine.tasks import make_token_batch

    enc = encode_pairs(tok, [(DEFAULT_TEMPLATE.as_prompt(p), a) for p, a in PAIRS])
    masks = [[lab != -100 for lab in labels] for _, labels in enc]
    batch = make_token_batch([ids for ids, _ in enc], tok.pad_token_id, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    labels=batch.labels)  # fmt: skip
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def save_pair(root: Path, arch: str) -> tuple[Path, Path]:
    """Write root/{pretrained,finetuned} (model + tokenizer) with save_pretrained."""
    tok = _tokenizer([t for _, t in DOCS] + [f"{p} {a}" for p, a in PAIRS]
                     + [DEFAULT_TEMPLATE.describe()])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model(arch, len(tok), tok.eos_token_id, tok.pad_token_id)
        model.save_pretrained(root / "pretrained")
        tok.save_pretrained(root / "pretrained")
        _finetune(model, tok).save_pretrained(root / "finetuned")
        tok.save_pretrained(root / "finetuned")
    return root / "pretrained", root / "finetuned"


def write_data(root: Path) -> tuple[Path, Path]:
    corpus, ft = root / "corpus.jsonl", root / "finetune.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in DOCS))
    ft.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PAIRS))
    return corpus, ft


@pytest.fixture(scope="module", params=ARCHS)
def own_pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    pt, ft = save_pair(root, request.param)
    corpus, data = write_data(root)
    return request.param, pt, ft, corpus, data, root


def _config(root: Path, **kw) -> AttributionConfig:
    return AttributionConfig(cache_dir=str(root / "cache"), progress=False, **kw)


def test_layers_detected(own_pair):
    """EK-FAC tracks every projection: Llama's q/k/v/o and gate/up/down, GPT-2's Conv1D."""
    arch, pt, ft, *_ = own_pair
    pair = load_model_pair(pt, ft)
    mods = find_modules(pair.pretrained)
    kinds = {m.kind for m in mods}
    by_group = {g: [m.name.rsplit(".", 1)[-1] for m in mods if m.group == g]
                for g in ("attention", "mlp", "other")}  # fmt: skip
    assert not by_group["other"] and not any("lm_head" in m.name for m in mods)
    expected = {
        "llama": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
        "gpt2": ({"c_attn", "c_proj"}, {"c_fc", "c_proj"}),
        "gpt_neox": ({"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
        "bloom": ({"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    }[arch]
    assert set(by_group["attention"]) == expected[0] and set(by_group["mlp"]) == expected[1]
    assert len(mods) == 2 * (len(expected[0]) + len(expected[1]))
    assert kinds == ({"conv1d"} if arch == "gpt2" else {"linear"})
    assert {m.group for m in find_modules(pair.pretrained, "mlp")} == {"mlp"}


def test_context_and_chunking(own_pair):
    arch, pt, ft, corpus, *_ = own_pair
    pair = load_model_pair(pt, ft)
    n_ctx, source = context_length(pair.pretrained, pair.tokenizer)
    assert n_ctx == CONTEXT
    assert ("tokenizer.model_max_length" in source) == (arch == "bloom")
    docs, report = chunk_documents(read_documents(corpus), pair.tokenizer, n_ctx)
    ids = [d for d, _ in docs]
    assert ids[:7] == [d for d, _ in DOCS[:7]]  # documents that fit keep their id, in order
    long_ids = [d for d in ids if d.startswith("long")]
    assert long_ids == [f"long#{n}" for n in range(1, len(long_ids) + 1)] and len(long_ids) > 2
    assert report.n_split == 1 and report.n_chunks == len(long_ids)
    assert "1 of 8 documents longer than 64 tokens were split into" in str(report)
    chunks = [t for d, t in docs if d in long_ids]
    for t in chunks:  # every chunk + eos fits the context
        assert len(pair.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 <= n_ctx
    squash = "".join(chunks).replace(" ", "")
    assert squash == dict(DOCS)["long"].replace(" ", "")  # nothing lost, nothing repeated


def test_scores_and_long_document_refusal(own_pair):
    arch, pt, ft, corpus, data, root = own_pair
    pair = load_model_pair(pt, ft)
    raw = read_documents(corpus)
    args = (pair.pretrained, pair.finetuned, pair.tokenizer)
    att = Attributor(*args, raw, read_pairs(data), _config(root), alpha=0.01)
    with pytest.raises(ValueError, match=r"document 'long' is \d+ tokens .* context is 64 "
                                         r"positions.*chunk_documents"):  # fmt: skip
        att.scores("single_stage", as_questions(att, [PAIRS[0]]), ["long"])
    docs, _ = chunk_documents(raw, pair.tokenizer, CONTEXT)
    att = Attributor(*args, docs, read_pairs(data), _config(root), alpha=0.01)
    ids = [d for d, _ in docs]
    qs = as_questions(att, PAIRS[:2])
    s = att.scores("multi_stage", qs, ids)
    assert s.shape == (2, len(ids)) and torch.isfinite(s).all() and s.abs().max() > 0
    rows = top_k(att, "multi_stage", PAIRS[:2], k=3)
    for r, row in zip(s, rows):  # the rows are the tensor's top 3, in order
        assert [h.doc_id for h in row] == [ids[i] for i in r.argsort(descending=True)[:3]]
        assert [h.score for h in row] == pytest.approx(r.sort(descending=True).values[:3])
        assert all(h.text == dict(docs)[h.doc_id] for h in row)


def test_cli_trace_on_own_pair(own_pair, capsys):
    arch, pt, ft, corpus, data, root = own_pair
    base = ["trace", "--pretrained", str(pt), "--finetuned", str(ft), "--corpus", str(corpus),
            "--finetune-data", str(data), "--alpha", "0.01", "--cache-dir",
            str(root / "cache"), "--quiet"]  # fmt: skip
    assert main(base + ["--json", "-k", "4", "--answer", "London", "--device", "auto",
                        "Where was Ada Lovelace born?"]) == 0  # fmt: skip
    out = capsys.readouterr()
    hits = json.loads(out.out)
    valid = {d for d, _ in DOCS[:7]} | {f"long#{n}" for n in range(1, 20)}
    assert len(hits) == 4 and all(h["doc_id"] in valid for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert "1 of 8 documents longer than 64 tokens were split into" in out.err
    assert "alpha = 0.01 (--alpha)" in out.err
    # the same scores as the API on the same inputs
    pair = load_model_pair(pt, ft)
    docs, _ = chunk_documents(read_documents(corpus), pair.tokenizer, CONTEXT)
    att = Attributor(pair.pretrained, pair.finetuned, pair.tokenizer, docs, read_pairs(data),
                     _config(root), alpha=0.01)  # fmt: skip
    api = top_k(att, "multi_stage", [("Where was Ada Lovelace born?", "London")], k=4)[0]
    assert [h["doc_id"] for h in hits] == [h.doc_id for h in api]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in api], rel=1e-5)


def test_cli_text_output_answers_with_the_model(own_pair, capsys):
    """Without --answer the fine-tuned model's greedy answer is attributed and printed."""
    arch, pt, ft, corpus, data, root = own_pair
    if arch not in ("llama", "gpt2"):
        pytest.skip("the greedy-answer path is architecture independent; two suffice")
    q = "Where was Marie Curie born?"
    pair = load_model_pair(pt, ft)
    expected = greedy_answers(pair.finetuned, pair.tokenizer, [DEFAULT_TEMPLATE.as_prompt(q)],
                              16)[0]  # fmt: skip
    assert expected.strip(), "the tiny fine-tune should answer"
    code = main(["trace", "--pretrained", str(pt), "--finetuned", str(ft), "--corpus",
                 str(corpus), "--finetune-data", str(data), "--alpha", "0.01", "--quiet",
                 "-k", "3", "--cache-dir", str(root / "cache"), q])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert f"answer (fine-tuned model): {expected.strip()}" in text
    assert "were split into" in text and "true source" not in text
    ranks = [line.split()[0] for line in text.splitlines() if re.match(r"\s+\d+\s", line)]
    assert ranks == ["1", "2", "3"]


def test_cli_own_pair_errors(own_pair, capsys):
    arch, pt, ft, corpus, data, root = own_pair
    if arch != "llama":
        pytest.skip("argument checks do not depend on the architecture")
    assert main(["trace", "--pretrained", str(pt), "--finetuned", str(ft), "q?"]) == 2
    assert "--corpus, --finetune-data as well" in capsys.readouterr().err
    assert main(["trace", "--pretrained", str(pt), "--finetuned", str(ft), "--corpus",
                 str(corpus), "--finetune-data", str(data), "q?"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "α is unknown" in err and "--alpha" in err
    (ft / "msif_meta.json").write_text(json.dumps({"alpha": 0.05}))
    try:
        assert main(["trace", "--pretrained", str(pt), "--finetuned", str(ft), "--corpus",
                     str(corpus), "--finetune-data", str(data), "--json", "--answer", "London",
                     "--cache-dir", str(root / "cache"), "-k", "2",
                     "Where was Ada Lovelace born?"]) == 0  # fmt: skip
        assert f"alpha = 0.05 (recorded in {ft})" in capsys.readouterr().err
    finally:
        (ft / "msif_meta.json").unlink()
    assert main(["trace", "--alpha", "0.1", "Where?"]) == 2
    assert "--alpha is for your own pair" in capsys.readouterr().err
    own = ["trace", "--pretrained", str(pt), "--finetuned", str(ft), "--corpus", str(corpus),
           "--finetune-data", str(data), "--alpha", "0.01", "Where?"]  # fmt: skip
    assert main(own + ["--device", "nosuch"]) == 2
    assert "is not a device: use cpu, cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(own + ["--device", "cuda"]) == 2
        assert "no CUDA GPU is visible here" in capsys.readouterr().err


def readme_block() -> str:
    """The Python block after the own-model-example marker in README.md."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = "<!-- own-model-example"
    assert marker in text, "README.md lost its own-model example marker"
    after = text[text.index(marker):]
    m = re.search(r"```python\n(.*?)```", after, re.S)
    assert m, "no ```python block after the marker"
    return m.group(1)


def test_readme_block_runs_as_printed(tmp_path, capsys):
    """Only the six variables at the block's top are replaced (by a tiny Llama pair here)."""
    pt, ft = save_pair(tmp_path, "llama")
    corpus, data = write_data(tmp_path)
    values = {"PRETRAINED": str(pt), "FINETUNED": str(ft), "CORPUS": str(corpus),
              "FINETUNE_DATA": str(data), "ALPHA": 0.01,
              "CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    code = readme_block()
    for name, value in values.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, count=1, flags=re.M)
        assert n == 1, f"the README block sets no {name}"
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "memory plan: llama" in out and "were split into" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[1-5] ", line)]
    assert len(rows) == 10  # 5 rows for each of the two questions
    valid = {d for d, _ in DOCS[:7]} | {f"long#{n}" for n in range(1, 20)}
    assert all(r[2] in valid for r in rows)


@pytest.mark.parametrize("name, group", [
    ("model.layers.0.self_attn.q_proj", "attention"),  # Llama, Mistral, Qwen2, Gemma
    ("model.layers.0.self_attn.o_proj", "attention"),
    ("model.layers.0.mlp.gate_proj", "mlp"),
    ("model.layers.0.mlp.down_proj", "mlp"),
    ("transformer.h.0.attn.c_attn", "attention"),  # GPT-2 (Conv1D)
    ("transformer.h.0.attn.c_proj", "attention"),
    ("transformer.h.0.mlp.c_proj", "mlp"),
    ("gpt_neox.layers.0.attention.dense", "attention"),  # GPT-NeoX
    ("transformer.h.0.self_attention.query_key_value", "attention"),  # BLOOM, Falcon
    ("transformer.h.0.mlp.dense_4h_to_h", "mlp"),
    ("model.decoder.layers.0.fc1", "mlp"),  # OPT
    ("model.decoder.layers.0.self_attn.out_proj", "attention"),
    ("model.layers.0.mlp.gate_up_proj", "mlp"),  # Phi-3
    ("transformer.h.0.mlp.fc_in", "mlp"),  # GPT-J
])  # fmt: skip
def test_layer_groups_of_common_families(name, group):
    from msif_lite.engine.layers import layer_group

    assert layer_group(name) == group
