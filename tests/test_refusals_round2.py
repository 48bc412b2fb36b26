"""No silently wrong result, round two (issue 27): what a user's own files, folders and
machine do to the kit. One test per case, through the public API (Attributor, top_k,
read_documents, read_pairs, load_model_pair, the CLI) on tiny Llama / GPT-2 pairs saved with
`save_pretrained`; the README's "What the kit refuses" table lists every case."""

from __future__ import annotations

import bz2
import copy
import errno
import gzip
import json
import os
import shutil
import signal
import unicodedata
import warnings
import zipfile

import numpy as np
import pytest
import torch
from test_own_model import DOCS, PAIRS, save_pair, write_data

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.retrieval import INDEX_FILE, EmbeddingIndex
from msif_lite.attribution.trace import as_questions
from msif_lite.cli import main
from msif_lite.engine import storage
from msif_lite.engine.factors import FactorConfig
from msif_lite.scale.pairs import load_model_pair, read_documents, read_pairs

MLP = FactorConfig(include="mlp", max_batches=2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    pt, ft = save_pair(root, "llama")
    corpus, data = write_data(root)
    return root, pt, ft, corpus, data


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    pt, ft = save_pair(root, "gpt2")
    corpus, data = write_data(root)
    return root, pt, ft, corpus, data


DOCS7 = DOCS[:7]  # the documents that fit the 64-token context


def _att(setup, cache, docs=DOCS7, pairs=PAIRS, pair=None, **cfg):
    root, pt, ft, *_ = setup
    pair = pair or load_model_pair(pt, ft)
    cfg.setdefault("factors", MLP)
    config = AttributionConfig(cache_dir=str(cache), progress=False, **cfg)
    return Attributor(pair.pretrained, pair.finetuned, pair.tokenizer, list(docs), pairs,
                      config, alpha=0.01)  # fmt: skip


def _own_cli(setup, *extra):
    root, pt, ft, corpus, data = setup
    return ["trace", "--pretrained", str(pt), "--finetuned", str(ft), "--corpus", str(corpus),
            "--finetune-data", str(data), "--alpha", "0.01", "--quiet", "--mlp-only",
            "--answer", "London", *extra]  # fmt: skip


# ---------------------------------------------------------------- silently wrong (6)
def test_dict_finetune_pairs_fit_like_tuples(llama, tmp_path):
    """1. Pairs in the .jsonl shape {"prompt", "answer"} were unpacked to their keys."""
    qs = [("Where was Ada Lovelace born?", "London")]
    as_tuples = _att(llama, tmp_path / "t")
    as_dicts = _att(llama, tmp_path / "d", pairs=[{"prompt": p, "answer": a} for p, a in PAIRS])
    assert as_dicts.finetune_pairs == as_tuples.finetune_pairs
    a, b = (x.scores("multi_stage", as_questions(x, qs), x.doc_ids) for x in (as_tuples, as_dicts))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"fine-tuning pair 1 is a dict with keys \['a', 'q'\]"):
        _att(llama, tmp_path / "x", pairs=[{"q": "Where?", "a": "London"}])


def test_unicode_variants_of_an_answer_are_one_answer(llama, tmp_path):
    """2. 'café' in NFC and NFD tokenised differently and changed the ranking; full-width
    letters changed scores without a word."""
    att = _att(llama, tmp_path)
    q = "Where was Ada Lovelace born?"
    nfc, nfd = "café", unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    s_nfc = att.scores("grad_dot", as_questions(att, [(q, nfc)]), att.doc_ids)
    with pytest.warns(UserWarning, match="normalised to Unicode NFC"):
        s_nfd = att.scores("grad_dot", as_questions(att, [(q, nfd)]), att.doc_ids)
    torch.testing.assert_close(s_nfc, s_nfd)
    with pytest.warns(UserWarning, match=r"compatibility characters.*'Apache'"):
        att.scores("grad_dot", as_questions(att, [(q, "Ａｐａｃｈｅ")]), att.doc_ids)


def test_crlf_plain_text_corpus_reads_every_paragraph(tmp_path):
    """3. A CRLF text file was read as one document."""
    paragraphs = ["First paragraph,\r\non two lines.", "Second one.", "Third one."]
    crlf, lf = tmp_path / "crlf.txt", tmp_path / "lf.txt"
    crlf.write_bytes("\r\n\r\n".join(paragraphs).encode())
    lf.write_text("\n\n".join(p.replace("\r\n", "\n") for p in paragraphs))
    docs = read_documents(crlf)
    assert [t for _, t in docs] == [t for _, t in read_documents(lf)]
    assert docs == [("crlf:1", "First paragraph, on two lines."), ("crlf:2", "Second one."),
                    ("crlf:3", "Third one.")]  # fmt: skip


@pytest.mark.parametrize("question", ["Question:", "Question: \nAnswer:", "  Answer: "])
def test_scaffold_only_question_is_refused(llama, tmp_path, question):
    """4. A question that is only the template's scaffold was answered and attributed."""
    att = _att(llama, tmp_path)
    for q in (question, (question, "London")):
        with pytest.raises(ValueError, match="only the template's scaffold"):
            att.top_k("grad_dot", [q], k=2)


def test_context_beyond_rope_positions_warns(llama, tmp_path):
    """5. context_length=4096 on a Llama with 64 positions scored past them without a word:
    RoPE can extrapolate, so it is allowed, with a warning that says so."""
    with pytest.warns(UserWarning, match=r"beyond the model's 64 trained positions.*rotary "
                                         r"positions \(RoPE\)"):  # fmt: skip
        att = _att(llama, tmp_path, context_length=4096)
    assert att.context == 4096


def test_unverifiable_tokenizer_warns_and_load_model_pair_names_the_fix(llama, tmp_path):
    """6. Model folders without tokenizer files + a same-size tokenizer with other merges
    were accepted without a word; load_model_pair on such folders failed with "Couldn't
    instantiate the backend tokenizer"."""
    from test_own_model import _tokenizer

    root, pt, ft, *_ = llama
    bare = {}
    for name, src in (("pretrained", pt), ("finetuned", ft)):
        bare[name] = tmp_path / name
        bare[name].mkdir()
        for f in src.iterdir():
            if f.name in ("config.json", "generation_config.json", "model.safetensors"):
                shutil.copy(f, bare[name] / f.name)
    with pytest.raises(FileNotFoundError, match="holds tokenizer files.*tokenizer=") as e:
        load_model_pair(bare["pretrained"], bare["finetuned"])
    assert "sentencepiece" not in str(e.value)
    right = load_model_pair(pt, ft).tokenizer
    other = _tokenizer([t[::-1] for _, t in DOCS] + [f"{a} {p}" for p, a in PAIRS])
    assert len(other) == len(right) and other.get_vocab() != right.get_vocab()
    with pytest.raises(ValueError, match="the tokenizer given and the one saved in .* differ"):
        load_model_pair(pt, ft, tokenizer=other)
    with pytest.warns(UserWarning, match="holds no tokenizer files, so the tokenizer given "
                                         "cannot be checked"):  # fmt: skip
        pair = load_model_pair(bare["pretrained"], bare["finetuned"], tokenizer=other)
    with pytest.warns(UserWarning, match=r"holds no tokenizer files.*save_pretrained"):
        _att(llama, tmp_path / "c", pair=pair)


# ---------------------------------------------------------------- unclear errors (11 + 3)
def test_scoring_a_dropped_empty_document_says_it_was_dropped(llama, tmp_path):
    """7. scores(…, ['e0']) for a dropped empty document: KeyError "unknown document id"."""
    with pytest.warns(UserWarning, match=r"dropped 1 empty.*'e0'"):
        att = _att(llama, tmp_path, docs=DOCS7 + [("e0", "  ")])
    qs = as_questions(att, [PAIRS[0]])
    with pytest.raises(KeyError, match="'e0' was dropped .* empty"):
        att.scores("grad_dot", qs, ["ada-birth", "e0"])


def test_nan_weights_in_an_in_memory_model_name_the_parameter(llama, tmp_path):
    """8. NaN in an in-memory model: `FloatingPointError: the loss is NaN` naming nothing."""
    root, pt, ft, *_ = llama
    pair = load_model_pair(pt, ft)
    pair.finetuned = copy.deepcopy(pair.finetuned)
    with torch.no_grad():
        dict(pair.finetuned.named_parameters())["model.layers.1.mlp.up_proj.weight"][0, 0] = \
            float("nan")  # fmt: skip
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' contains "
                                         "NaN or inf"):  # fmt: skip
        _att(llama, tmp_path, pair=pair)


def test_finetune_pair_with_empty_answer_is_named_at_once(llama, tmp_path):
    """9. Refused only at the first scores call, without saying which fine-tuning pair."""
    with pytest.raises(ValueError, match=r"fine-tuning pair 7 .* has an empty answer"):
        _att(llama, tmp_path, pairs=PAIRS + [("Where was Nobody born?", " ")])
    f = tmp_path / "ft.jsonl"
    f.write_text(json.dumps({"prompt": "Where?", "answer": "London"}) + "\n"
                 + json.dumps({"prompt": "Where else?", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match=r"ft\.jsonl:2: the fine-tuning pair has an empty "
                                         "'answer'"):  # fmt: skip
        read_pairs(f)


def test_question_leaving_no_room_for_the_answer_says_so(llama, tmp_path):
    """10. A question that fits but leaves under 16 tokens for the greedy answer:
    "shorten the question" without saying by how much or why."""
    att = _att(llama, tmp_path)

    def n_tokens(q):
        prompt = att.config.template.as_prompt(q)
        return len(att.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    q = next(f"Where was Ada {'born ' * n}?" for n in range(1, 64)
             if n_tokens(f"Where was Ada {'born ' * n}?") + 16 > att.context)  # fmt: skip
    assert n_tokens(q) < att.context
    with pytest.raises(ValueError, match=r"positions for the model's own answer.*at least \d+ "
                                         r"tokens.*pass the answer"):  # fmt: skip
        att.top_k("grad_dot", [q], k=2)


def _refuse_writes_under(monkeypatch, folder, code):
    """tempfile.mkstemp fails (read-only) or fsync fails (disk full) for files under `folder`."""
    real_mkstemp, real_fsync, ours = storage.tempfile.mkstemp, storage.os.fsync, set()

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and str(dir).startswith(str(folder)):
            if code == errno.EROFS:
                raise OSError(code, os.strerror(code))
            fd, name = real_mkstemp(*a, dir=dir, **kw)
            ours.add(fd)
            return fd, name
        return real_mkstemp(*a, dir=dir, **kw)

    def fsync(fd):
        if fd in ours:
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(storage.os, "fsync", fsync)


def test_read_only_cache_folder_names_the_folder_and_the_fix(llama, tmp_path, monkeypatch,
                                                             capsys):  # fmt: skip
    """11. An empty read-only cache folder: `OSError: [Errno 30]` (CLI: traceback, rc 1)."""
    cache = tmp_path / "ro"
    cache.mkdir()
    _refuse_writes_under(monkeypatch, cache, errno.EROFS)
    att = _att(llama, cache)
    with pytest.raises(OSError, match=rf"cannot write to the cache folder {cache}.*--cache-dir"):
        att.scores("multi_stage", as_questions(att, [PAIRS[0]]), att.doc_ids)
    assert main(_own_cli(llama, "--cache-dir", str(cache), "Where was Ada Lovelace born?")) == 2
    err = capsys.readouterr().err
    assert "cannot write to the cache folder" in err and "Traceback" not in err


def test_disk_full_names_the_folder_and_leaves_nothing_half_written(llama, tmp_path,
                                                                     monkeypatch, capsys):
    """12. Disk full: `OSError: [Errno 28]` (CLI traceback); nothing corrupt left."""
    cache = tmp_path / "full"
    _refuse_writes_under(monkeypatch, cache, errno.ENOSPC)
    assert main(_own_cli(llama, "--cache-dir", str(cache), "Where was Ada Lovelace born?")) == 2
    err = capsys.readouterr().err
    assert "is full" in err and str(cache) in err and "gradient_cache_gb" in err
    assert not [p for p in cache.rglob("*") if p.is_file()], "a half-written file was left"


@pytest.mark.parametrize("k", [2.5, "3", None])
def test_top_k_checks_the_type_of_k(llama, tmp_path, k):
    """13. top_k(k=2.5): `TypeError: slice indices must be integers`."""
    att = _att(llama, tmp_path)
    with pytest.raises(TypeError, match=r"k must be a whole number of documents"):
        att.top_k("grad_dot", [PAIRS[0]], k=k)
    assert len(att.top_k("grad_dot", [PAIRS[0]], k=np.int64(2))[0]) == 2


def test_gzip_and_other_compressed_corpora(tmp_path):
    """14. A gzip corpus: "invalid UTF-8 at byte 1 … pass errors='replace'"."""
    lines = "".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in DOCS7).encode()
    (tmp_path / "corpus.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "named.jsonl").write_bytes(gzip.compress(lines))  # gzip without .gz
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(b"One.\n\nTwo."))
    assert read_documents(tmp_path / "corpus.jsonl.gz") == DOCS7
    assert read_documents(tmp_path / "named.jsonl") == DOCS7
    assert read_documents(tmp_path / "c.txt.bz2") == [("c:1", "One."), ("c:2", "Two.")]
    with zipfile.ZipFile(tmp_path / "corpus.zip", "w") as z:
        z.writestr("corpus.jsonl", lines)
    with pytest.raises(ValueError, match="is a zip archive, not text: decompress it first"):
        read_documents(tmp_path / "corpus.zip")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02\xff" * 20)
    with pytest.raises(ValueError, match="not a text file") as e:
        read_documents(tmp_path / "blob.bin")
    assert "errors='replace'" not in str(e.value)


def test_json_array_files(tmp_path):
    """15. A one-line JSON array in a .json file: "has no string field 'text' (keys: list)"."""
    (tmp_path / "corpus.json").write_text(json.dumps([{"id": d, "text": t} for d, t in DOCS7]))
    assert read_documents(tmp_path / "corpus.json") == DOCS7
    (tmp_path / "plain.json").write_text(json.dumps(["One.", "Two."], indent=2))
    assert read_documents(tmp_path / "plain.json") == [("plain:1", "One."), ("plain:2", "Two.")]
    (tmp_path / "ft.json").write_text(json.dumps([{"prompt": p, "answer": a} for p, a in PAIRS]))
    assert read_pairs(tmp_path / "ft.json") == PAIRS
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n["a", "b"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is a JSON array, not an object"):
        read_documents(tmp_path / "bad.jsonl")


def test_context_beyond_learned_positions_is_refused(gpt2, tmp_path, capsys):
    """16. context_length=4096 on GPT-2: `IndexError: index out of range in self`."""
    with pytest.raises(ValueError, match=r"beyond the model's 64 positions .* learned table"):
        _att(gpt2, tmp_path, context_length=4096)
    assert main(_own_cli(gpt2, "--context-length", "4096", "--cache-dir", str(tmp_path),
                         "Where was Ada Lovelace born?")) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "learned table" in err and "Traceback" not in err


def test_a_long_prompt_is_not_echoed_whole(llama, tmp_path):
    """17. An error for a too-long prompt echoed the whole 24,000-character prompt."""
    att = _att(llama, tmp_path)
    prompt = "Where was Ada Lovelace born, " + "and where " * 2400 + "?"
    assert len(prompt) > 24_000
    with pytest.raises(ValueError, match="context is 64 positions") as e:
        att.scores("grad_dot", as_questions(att, [(prompt, "London")]), att.doc_ids)
    assert len(str(e.value)) < 600 and "characters]" in str(e.value)


class _Embedder:
    """A stand-in for all-MiniLM-L6-v2: deterministic 8-dim vectors, no model."""

    msif_name = "stand-in"

    def __init__(self, on_encode=None):
        self.on_encode = on_encode

    def encode(self, texts, **kw):
        if self.on_encode:
            self.on_encode()
        rng = np.random.default_rng([len(t) for t in texts])
        return rng.standard_normal((len(texts), 8)).astype(np.float32)


def test_a_bit_flip_in_the_embedding_index_is_rebuilt_with_a_warning(tmp_path):
    """18. The README promised a warning for a corrupted cache file; the embedding index was
    rebuilt silently."""
    ids, texts = [d for d, _ in DOCS7], [t for _, t in DOCS7]
    emb = _Embedder()
    first = EmbeddingIndex.build_or_load(tmp_path, ids, texts, embedder=emb, progress=False)
    f = tmp_path / INDEX_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"{INDEX_FILE} fails its checksum.*recomputing it"):
        again = EmbeddingIndex.build_or_load(tmp_path, ids, texts, embedder=emb, progress=False)
    assert again.search(["Ada"], 3) == first.search(["Ada"], 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt and saved: the next load is silent
        EmbeddingIndex.build_or_load(tmp_path, ids, texts, embedder=emb, progress=False)


def test_sigint_during_the_embedding_phase_is_not_swallowed(tmp_path):
    """19. A Ctrl-C that lands in a finaliser while embedding ("Exception ignored in:
    <function Group.__del__>") was lost and the run went on."""

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10_000))  # the Python-level handler runs here, inside __del__

    def on_encode():
        Finalised()  # created and collected at once: its __del__ gets the Ctrl-C

    ids, texts = [d for d, _ in DOCS7], [t for _, t in DOCS7]
    with pytest.raises(KeyboardInterrupt):
        EmbeddingIndex.build_or_load(tmp_path, ids, texts, embedder=_Embedder(on_encode),
                                     progress=False)  # fmt: skip
    assert not (tmp_path / INDEX_FILE).exists(), "nothing is written after an interrupt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
