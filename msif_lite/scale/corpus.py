"""Reading a user's data (`msif-lite trace --corpus FILE --finetune-data FILE`; notebook 09):

- `read_documents`: (doc_id, text) pairs from a JSON-lines file ({"id": …, "text": …} per
  line; the ids are kept), a JSON file holding one array of such objects, or plain text (one
  document per blank-line-separated paragraph, LF or CRLF, ids `<file stem>:<paragraph
  number>`); gzip, bzip2 and xz files are decompressed, other archives refused by name;
  `read_texts` gives the texts only;
- `read_pairs`: fine-tuning (prompt, answer) pairs from JSON lines ({"prompt", "answer"}) or
  a JSON array, each checked (an empty answer names its line).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from msif_lite.engine.inputs import INVISIBLE

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
