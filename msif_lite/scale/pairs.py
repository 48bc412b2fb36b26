"""A pre-trained / fine-tuned Hugging Face model pair and the text to fit factors on.

Notebook 09 (BLOOM-560m → BLOOMZ-560m). `load_model_pair` goes through the ordinary
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` path, so a hub id
works wherever the user has the model cached (or network), and a local directory always
does; it then checks that the two models can form a multi-stage pair:

- same architecture: the same config `model_type` and the same parameter names and shapes
  (θ_ft and θ_pt must live in one parameter space);
- same tokenizer: the fine-tuned checkpoint's tokenizer (if it ships one) has the same
  vocabulary size and gives the same token ids for `PROBE` as the pre-trained one, and the
  model's embedding has a row for every token.

Reading a user's data (`msif-lite trace --corpus FILE --finetune-data FILE`):

- `read_documents`: (doc_id, text) pairs from a JSON-lines file ({"id": …, "text": …} per
  line; the ids are kept) or from plain text (one document per blank-line-separated
  paragraph, ids `<file stem>:<paragraph number>`); `read_texts` gives the texts only;
- `read_pairs`: fine-tuning (prompt, answer) pairs from JSON lines ({"prompt", "answer"});
- `chunk_documents`: the long-document policy. A document longer than the model's context
  (`checks.context_length`) is cut, at token boundaries, into consecutive non-overlapping
  chunks of at most context − 1 tokens (each chunk + eos fits), ids `doc#1`, `doc#2`, …;
  each chunk is then a candidate of its own (what pre-training on packed or truncated
  sequences saw). Documents that fit keep their id. The Attributor refuses a longer one.

`world_texts` is the default stand-in: the kit's own world.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from msif_lite.attribution.checks import (
    check_checkpoint_tokenizer,
    check_same_architecture,
    check_same_tokenizer,
    check_tokenizer_fits,
    has_tokenizer_files,
)
from msif_lite.engine.inputs import INVISIBLE
from msif_lite.engine.layers import check_finite_parameters

DEFAULT_PRETRAIN_TOKENS = 1_000_000
"""Default token budget of the pre-training text for H_pt (the issue's 1M-token target)."""
DEFAULT_FINETUNE_TOKENS = 200_000
"""Default token budget of the fine-tuning text for H_ft."""


@dataclass
class ModelPair:
    """θ_pt and θ_ft with their (shared) tokenizer; `names` are what was asked for."""

    pretrained: nn.Module
    finetuned: nn.Module
    tokenizer: object
    names: tuple[str, str]

    def describe(self) -> str:
        """One line saying which models actually ran (for notebook outputs)."""
        c = self.pretrained.config
        n = sum(p.numel() for p in self.pretrained.parameters())
        return (f"pre-trained: {_short(self.names[0])} → fine-tuned: {_short(self.names[1])} "
                f"({c.model_type}, {n / 1e6:.3g}M parameters, vocabulary {len(self.tokenizer)})")


def _short(name: str) -> str:
    """A hub id as is; a local directory by its last two parts (no absolute paths)."""
    p = Path(name)
    return name if not p.exists() else "/".join(p.parts[-2:])


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load(kind: str, name: str, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loader = AutoModelForCausalLM if kind == "model" else AutoTokenizer
    try:
        return loader.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        if Path(name).exists():
            raise
        hint = ("HF_HUB_OFFLINE=1 is set, so only the local Hugging Face cache is searched"
                if _offline() else "the hub could not be reached or has no such repository")
        raise FileNotFoundError(
            f"could not load the {kind} {name!r}: {hint}. Download it once where there is "
            f"network (huggingface-cli download {name}), or pass a local directory written "
            f"by save_pretrained (e.g. MSIF_BLOOM_PT / MSIF_BLOOM_FT in Notebook 09). "
            f"[{type(e).__name__}: {str(e).splitlines()[0][:200]}]") from e


def _tokenizer_source(names: tuple[str, str], tokenizer) -> str | None:
    """Where to load the tokenizer from when none is given: the pre-trained checkpoint, or
    the fine-tuned one when only it is a local directory with tokenizer files; refuses two
    local directories without any (transformers would fail with "Couldn't instantiate the
    backend tokenizer … sentencepiece or tiktoken")."""
    if tokenizer is not None:
        return None
    local = [Path(n).is_dir() for n in names]
    files = [has_tokenizer_files(n) for n in names]
    if files[0] or not local[0]:
        return names[0]
    if files[1] or not local[1]:
        return names[1]
    raise FileNotFoundError(
        f"neither {names[0]} nor {names[1]} holds tokenizer files (tokenizer.json, "
        "tokenizer_config.json, vocab.json/merges.txt or tokenizer.model): save the tokenizer "
        "the models were trained with beside the weights (tokenizer.save_pretrained(dir)), or "
        "pass it: load_model_pair(…, tokenizer=<the tokenizer or its directory>)")


def load_model_pair(
    pretrained_id_or_dir: str | os.PathLike,
    finetuned_id_or_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    tokenizer=None,
) -> ModelPair:
    """Load θ_pt, θ_ft (`AutoModelForCausalLM.from_pretrained(..., dtype=dtype)`, eval mode)
    and the tokenizer (from the pre-trained checkpoint, else the fine-tuned one), and check
    they form a pair (see the module docstring). `tokenizer` (a tokenizer, or a directory /
    hub id to load one from) is used instead and compared with every tokenizer saved beside
    the weights; when neither folder holds one it cannot be compared, and a warning says so.
    Raises FileNotFoundError (offline, not cached; no tokenizer files anywhere) or
    ValueError."""
    names = (str(pretrained_id_or_dir), str(finetuned_id_or_dir))
    pt = _load("model", names[0], dtype=dtype).eval()
    ft = _load("model", names[1], dtype=dtype).eval()
    if pt.config.model_type != ft.config.model_type:
        raise ValueError(f"the models have different architectures: {pt.config.model_type!r} "
                         f"vs {ft.config.model_type!r}. Load the fine-tune of this model.")
    check_same_architecture(pt, ft)
    check_finite_parameters(pt, names[0])
    check_finite_parameters(ft, names[1])
    source = _tokenizer_source(names, tokenizer)
    if tokenizer is None:
        tok = _load("tokenizer", source)
    elif isinstance(tokenizer, str | os.PathLike):
        tok = _load("tokenizer", str(tokenizer))
    else:
        tok = tokenizer
    for name in names:
        if Path(name).is_dir() and not has_tokenizer_files(name):
            continue  # nothing saved there to compare with
        if name == source:
            continue
        try:
            saved = _load("tokenizer", name)
        except (FileNotFoundError, OSError, ValueError):
            continue  # a fine-tune without its own tokenizer files uses the base one
        what = ("the two checkpoints' tokenizers" if tokenizer is None else
                f"the tokenizer given and the one saved in {name}")  # fmt: skip
        check_same_tokenizer(saved, tok, what=what)
    check_tokenizer_fits(pt, tok)
    if tokenizer is not None and not any(has_tokenizer_files(n) for n in names):
        check_checkpoint_tokenizer(pt, tok)  # warns: nothing to compare the given one with
    if device is not None:
        pt, ft = pt.to(device), ft.to(device)
    return ModelPair(pt, ft, tok, names)


COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"PK\x03\x04": "zip", b"\x28\xb5\x2f\xfd": "zstd"}  # fmt: skip
"""Magic bytes of compressed files: gzip, bzip2 and xz are read (decompressed in memory),
zip and zstd are refused by name."""
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zip", ".zst")


def _decompress(p: Path, data: bytes) -> bytes:
    for magic, kind in COMPRESSED.items():
        if not data.startswith(magic):
            continue
        if kind in ("zip", "zstd"):
            raise ValueError(f"{p} is a {kind} archive, not text: decompress it first "
                             f"({'unzip' if kind == 'zip' else 'zstd -d'} {p.name}) and point "
                             "to the .jsonl or text file inside")  # fmt: skip
        import bz2
        import gzip
        import lzma

        try:
            return {"gzip": gzip.decompress, "bzip2": bz2.decompress,
                    "xz": lzma.decompress}[kind](data)  # fmt: skip
        except (OSError, EOFError, ValueError, lzma.LZMAError) as e:
            raise ValueError(f"{p} starts like a {kind} file but does not decompress ({e}): "
                             "the file is truncated or damaged; copy it again") from None
    return data


def _read_utf8(path: str | os.PathLike, errors: str) -> tuple[Path, str]:
    """(path, text): UTF-8 (a leading byte-order mark dropped), gzip / bzip2 / xz files
    decompressed first, CRLF and CR line ends read as LF."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no text file at {p}")
    data = _decompress(p, p.read_bytes())
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{p} is UTF-16 text: save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        text = data.decode("utf-8", errors=errors).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        if b"\x00" in data[:4096]:
            raise ValueError(f"{p}: not a text file (binary data: NUL bytes near byte "
                             f"{data.index(0)}); point to the UTF-8 .jsonl or plain-text corpus "
                             "(gzip, bzip2 and xz files are read as they are)") from e
        raise ValueError(f"{p}: invalid UTF-8 at byte {e.start} ({e.reason}); fix the file or "
                         "pass errors='replace' (or 'ignore') to read on") from e
    return p, text.replace("\r\n", "\n").replace("\r", "\n")


def _json_lines(p: Path, raw: str):
    """(where, parsed value) of every row: every non-blank line of JSON lines, or every item
    of a file that holds one JSON array (on one line or pretty-printed)."""
    head = raw.lstrip()
    if head.startswith("["):
        try:
            whole = json.loads(raw)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            yield from ((f"{p.name} item {i}", row) for i, row in enumerate(whole, 1))
            return
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = (" (the file looks like one pretty-printed JSON value: write one object per "
                    "line, JSON lines, or one JSON array)" if head[:1] in "{[" else "")
            raise ValueError(f"{p.name}:{i} is not a JSON line ({e.msg}){hint}") from e
        if isinstance(row, list):
            raise ValueError(f"{p.name}:{i} is a JSON array, not an object: write one object "
                             "per line (JSON lines) or the whole file as one JSON array")
        yield f"{p.name}:{i}", row


def _stem(p: Path) -> str:
    """The file's stem without a compression suffix (corpus.jsonl.gz → corpus)."""
    name = p.name
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    return Path(name).stem


def _is_json_lines(p: Path) -> bool:
    name = p.name
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    return Path(name).suffix in (".jsonl", ".json")


def read_documents(path: str | os.PathLike, field: str = "text", id_field: str = "id",
                   max_tokens: int | None = None, tokenizer=None, split: str = "paragraph",
                   errors: str = "strict") -> list[tuple[str, str]]:  # fmt: skip
    """(doc_id, text) documents from a file, in order, until `max_tokens` is reached.

    - `*.jsonl` / `*.json` (JSON lines): one document per line, the string under `field`
      (a line that is a bare JSON string is taken as is); the id is `str(row[id_field])`
      when the line has one, else `<file stem>:<line number>`; blank lines are skipped.
      A file holding one JSON array (of such objects or strings) is read item by item
      (ids `<file stem>:<item number>` where an item has none).
    - anything else, plain text: `split="paragraph"` (default) makes one document per
      blank-line-separated paragraph (its lines joined by spaces; CRLF line ends and lines
      of only spaces count as blank); `split="line"` one per
      non-empty line; ids `<file stem>:<n>` (n = 1, 2, … over the documents).
    Ids must be unique. Tokens are counted with `tokenizer` when given, else as
    whitespace-separated words; the document that crosses the budget is the last one kept.
    `errors` is passed to the UTF-8 decoder ('strict' refuses invalid bytes, naming the
    offset; 'replace' or 'ignore' read on). gzip / bzip2 / xz files (`corpus.jsonl.gz`) are
    decompressed first; zip, zstd, UTF-16 and binary files are refused by name. Documents
    longer than the model's context: `chunk_documents`.
    """
    if split not in ("paragraph", "line"):
        raise ValueError(f"split must be 'paragraph' or 'line', got {split!r}")
    p, raw = _read_utf8(path, errors)
    stem = _stem(p)
    if _is_json_lines(p):
        docs = []
        for n, (where, row) in enumerate(_json_lines(p, raw), 1):
            i = where.rsplit(":", 1)[-1] if ":" in where else str(n)
            if isinstance(row, str):
                docs.append((f"{stem}:{i}", row))
            elif isinstance(row, dict) and isinstance(row.get(field), str):
                doc_id = row.get(id_field)
                docs.append((f"{stem}:{i}" if doc_id is None else str(doc_id), row[field]))
            else:
                raise ValueError(f"{where} has no string field {field!r} (keys: "
                                 f"{sorted(row) if isinstance(row, dict) else type(row).__name__})")
    else:
        texts = ([x.strip() for x in raw.splitlines() if x.strip()] if split == "line" else
                 [" ".join(x.split()) for x in re.split(r"\n\s*\n", raw) if x.strip()])
        docs = [(f"{stem}:{n}", t) for n, t in enumerate(texts, 1)]
    if not docs:
        raise ValueError(f"{p} holds no documents (empty or blank): point to the corpus file")
    seen: dict[str, int] = {}
    for n, (d, _) in enumerate(docs):
        if d in seen:
            raise ValueError(f"{p.name}: the document id {d!r} occurs twice (documents "
                             f"{seen[d] + 1} and {n + 1}); give every document a unique "
                             f"{id_field!r}")  # fmt: skip
        seen[d] = n
    kept = budget([t for _, t in docs], max_tokens, tokenizer)
    return docs[: len(kept)]


def read_texts(path: str | os.PathLike, field: str = "text", max_tokens: int | None = None,
               tokenizer=None, split: str = "paragraph", errors: str = "strict") -> list[str]:
    """The texts of `read_documents(path, …)` (same formats, budget and errors)."""
    return [t for _, t in read_documents(path, field, max_tokens=max_tokens, tokenizer=tokenizer,
                                         split=split, errors=errors)]  # fmt: skip


def read_pairs(path: str | os.PathLike, prompt_field: str = "prompt",
               answer_field: str = "answer", errors: str = "strict") -> list[tuple[str, str]]:
    """Fine-tuning (prompt, answer) pairs from a JSON-lines file, one
    {"prompt": …, "answer": …} object per line (or a .json file holding one JSON array of
    them; gzip / bzip2 / xz files are decompressed; a pair with an empty prompt or answer is
    refused, naming its line). A prompt is a question ('Where was X
    born?') or an already formatted prompt; `PromptTemplate.as_prompt` formats both alike."""
    p, raw = _read_utf8(path, errors)
    if not _is_json_lines(p):
        raise ValueError(f"{p}: fine-tuning data must be JSON lines (.jsonl) with "
                         f"{prompt_field!r} and {answer_field!r} fields per line")  # fmt: skip
    pairs = []
    for where, row in _json_lines(p, raw):
        ok = isinstance(row, dict) and all(isinstance(row.get(f), str)
                                           for f in (prompt_field, answer_field))  # fmt: skip
        if not ok:
            raise ValueError(f"{where} needs string fields {prompt_field!r} and "
                             f"{answer_field!r} (keys: "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__})")
        for f, why in ((prompt_field, "no question"), (answer_field, "no tokens to fit H_ft on")):
            if not row[f].strip(INVISIBLE):
                raise ValueError(f"{where}: the fine-tuning pair has an empty {f!r}, so it has "
                                 f"{why}: fix or drop that line")  # fmt: skip
        pairs.append((row[prompt_field], row[answer_field]))
    if not pairs:
        raise ValueError(f"{p} holds no fine-tuning pairs (empty or blank)")
    return pairs


@dataclass(frozen=True)
class ChunkReport:
    """What `chunk_documents` did: how many documents were split into how many chunks."""

    context: int
    n_documents: int
    n_split: int
    n_chunks: int
    example: str = ""  # e.g. "long → long#1 … long#4"

    def __str__(self) -> str:
        if not self.n_split:
            return f"all {self.n_documents} documents fit the context of {self.context} tokens"
        return (f"{self.n_split} of {self.n_documents} documents longer than {self.context} "
                f"tokens were split into {self.n_chunks} chunks ({self.example})")


def _token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of every token of `text` (fast tokenizers' offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chunk_documents cuts at token boundaries and needs a fast tokenizer "
                         "(character offsets): load it with AutoTokenizer.from_pretrained(dir, "
                         "use_fast=True)")  # fmt: skip
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [tuple(o) for o in enc["offset_mapping"]]


def _split(tokenizer, text: str, size: int) -> list[str]:
    """`text` cut at token boundaries into pieces that each encode to at most `size` tokens."""
    spans = _token_spans(tokenizer, text)
    pieces, i = [], 0
    while i < len(spans):
        j = min(i + size, len(spans))
        while True:
            end = spans[j][0] if j < len(spans) else len(text)
            piece = text[spans[i][0]:end].strip()
            n = count_tokens(piece, tokenizer) - 1
            if n <= size or j == i + 1:
                break
            j = max(i + 1, j - (n - size))  # re-encoding a cut piece can add a token
        if piece:
            pieces.append(piece)
        i = j
    return pieces


def chunk_documents(documents: Sequence[tuple[str, str]], tokenizer, context: int
                    ) -> tuple[list[tuple[str, str]], ChunkReport]:  # fmt: skip
    """Split every document whose tokens + eos exceed `context` (the model's positions,
    `checks.context_length(model, tokenizer)`) into consecutive chunks of at most
    context − 1 tokens cut at token boundaries, ids `<id>#1`, `<id>#2`, …, in order;
    documents that fit keep their id (see the module docstring for the policy)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2 tokens, got {context!r}")
    out, n_split, n_chunks, example = [], 0, 0, ""
    ids = {d for d, _ in documents}
    for doc_id, text in documents:
        if count_tokens(text, tokenizer) <= context:
            out.append((doc_id, text))
            continue
        pieces = _split(tokenizer, text, context - 1)
        clash = [f"{doc_id}#{n}" for n in range(1, len(pieces) + 1) if f"{doc_id}#{n}" in ids]
        if clash:
            raise ValueError(f"cannot name the chunks of {doc_id!r}: the id {clash[0]!r} is "
                             "already a document's; rename it")  # fmt: skip
        out.extend((f"{doc_id}#{n}", t) for n, t in enumerate(pieces, 1))
        n_split, n_chunks = n_split + 1, n_chunks + len(pieces)
        example = example or f"{doc_id} → {doc_id}#1 … {doc_id}#{len(pieces)}"
    return out, ChunkReport(context, len(documents), n_split, n_chunks, example)


def recorded_alpha(finetuned_dir: str | os.PathLike) -> float | None:
    """The proximity strength α a fine-tuned checkpoint records, if it is one of the kit's
    (`msif_meta.json` of the training pipeline, `msif_standin.json` of `save_standin`);
    None for any other checkpoint (a hub id, a user's own fine-tune)."""
    d = Path(finetuned_dir)
    for name in ("msif_meta.json", "msif_standin.json"):
        f = d / name
        if f.is_file():
            alpha = json.loads(f.read_text()).get("alpha")
            if alpha is not None:
                return float(alpha)
    return None


def count_tokens(text: str, tokenizer=None) -> int:
    if tokenizer is None:
        return len(text.split())
    """Tokens of `text` + eos with `tokenizer`, else whitespace-separated words."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return len(ids) + 1  # + eos


def budget(docs: Sequence[str], max_tokens: int | None, tokenizer=None) -> list[str]:
    """The first documents whose token count reaches `max_tokens` (None: all)."""
    if max_tokens is None:
        return list(docs)
    out, n = [], 0
    for d in docs:
        if n >= max_tokens:
            break
        out.append(d)
        n += count_tokens(d, tokenizer)
    return out


def world_texts(preset: str = "ci-fast", seed: int = 0):
    """The default stand-in data: (pre-training documents [(doc_id, text)], fine-tuning
    (prompt, answer) pairs, queries) of the kit's world (msif_lite.world.generate)."""
    from msif_lite.world.generate import make_world

    w = make_world(preset, seed=seed)
    docs = [(d.doc_id, d.text) for d in w.documents]
    return w, docs, [(q.prompt, q.answer) for q in w.finetune_qa]


STANDIN_ALPHA = 0.01
"""Proximity strength α of the stand-in's fine-tune (recorded in finetuned/msif_standin.json)."""


def save_standin(out_dir: str | os.PathLike, world=None, *, hidden: int = 64, n_layers: int = 2,
                 n_heads: int = 4, pretrain_steps: int = 60, finetune_steps: int = 30,
                 seed: int = 0) -> tuple[Path, Path]:
    """A tiny BLOOM pair standing in for BLOOM-560m → BLOOMZ-560m when those are not on disk:
    a byte-level BPE tokenizer trained on the kit's world, a BLOOM of the given shape
    pre-trained for `pretrain_steps` on the world's documents and fine-tuned for
    `finetune_steps` on its QA pairs with the proximity term (α = STANDIN_ALPHA); both are
    written with `save_pretrained` (model + tokenizer) to out_dir/{pretrained,finetuned}, so
    `load_model_pair` loads them exactly as it loads the real checkpoints."""
    from msif_lite.world.lm import ModelPreset, build_model, train_tokenizer
    from msif_lite.world.training import TrainConfig, finetune, pretrain, snapshot_params

    if world is None:
        from msif_lite.world.generate import make_world

        world = make_world("ci-fast", seed=seed)
    out = Path(out_dir)
    tok = train_tokenizer(world)
    preset = ModelPreset("bloom-standin", "bloom", n_layers, hidden, n_heads, 4 * hidden)
    model = build_model(preset, len(tok), seed, tok)
    pretrain(model, tok, world, TrainConfig(steps=pretrain_steps, batch_size=16, lr=3e-3,
                                            warmup=5, seed=seed, progress=False))  # fmt: skip
    model.save_pretrained(out / "pretrained")
    tok.save_pretrained(out / "pretrained")
    ref = snapshot_params(model)
    finetune(model, ref, tok, world.finetune_qa, TrainConfig(
        steps=finetune_steps, batch_size=16, lr=1e-3, warmup=3, seed=seed, progress=False),
        STANDIN_ALPHA)
    model.save_pretrained(out / "finetuned")
    tok.save_pretrained(out / "finetuned")
    meta = {"alpha": STANDIN_ALPHA, "world": world.preset, "seed": seed,
            "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps}
    (out / "finetuned" / "msif_standin.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out / "pretrained", out / "finetuned"
