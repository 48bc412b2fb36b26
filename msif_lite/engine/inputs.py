"""What a user passes in, normalised or refused with an error that names the fix (the README's
"What the kit refuses" table; tests/test_refusals_round2.py).

- `normalise_text`: questions and answers in Unicode NFC ("café" typed with a combining
  accent and with "é" are one answer), with a warning when that changed the text and when
  the text holds compatibility characters (full-width "Ａｐａｃｈｅ") that NFC keeps;
- `as_pairs`: fine-tuning pairs as (prompt, answer) tuples, from tuples, lists, objects with
  .prompt/.answer or dicts {"prompt": …, "answer": …} (the .jsonl shape), each checked;
- `prepare_documents` / `unknown_document`: (doc_id, text) documents with the empty ones
  dropped and remembered, so that asking for a dropped id says it was dropped;
- `check_top_k`: k (and n_candidates) as whole numbers;
- `shorten`: a long text quoted in an error message, cut in the middle.
"""

from __future__ import annotations

import operator
import unicodedata
import warnings
from collections.abc import Mapping, Sequence

NORMAL_FORM = "NFC"
"""Questions, answers and fine-tuning pairs are compared and tokenised in this form."""
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff \t\r\n"  # zero-width and white space
_SAID: set[tuple[str, str]] = set()  # (what, text) already warned about: once per text


def shorten(text: str, limit: int = 160) -> str:
    """repr(text), or for a long text its start and end around '…[N characters]…', so an
    error message never echoes a whole 24,000-character prompt."""
    r = repr(text)
    if len(r) <= limit:
        return r
    keep = max(20, (limit - 30) // 2)
    return f"{r[:keep]}…[{len(text):,} characters]…{r[-keep:]}"


def normalise_text(text: str, what: str = "text") -> str:
    """`text` in Unicode NFC. Warns (once per text) when NFC changed it ('café' with a
    combining accent) and when it holds compatibility characters NFC keeps but that tokenise
    differently from their plain form (full-width 'Ａｐａｃｈｅ', ligatures): those are kept
    as given, and the warning names the plain (NFKC) form to pass instead."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}: {text!r}")
    out = unicodedata.normalize(NORMAL_FORM, text)
    if out != text and (what, text) not in _SAID:
        _SAID.add((what, text))
        warnings.warn(f"the {what} {shorten(text, 80)} was normalised to Unicode NFC "
                      f"({shorten(out, 80)}): questions and answers are compared and "
                      "tokenised in NFC, so composed and decomposed accents give one answer",
                      UserWarning, stacklevel=3)  # fmt: skip
    plain = unicodedata.normalize("NFKC", out)
    if plain != out and (what + ":nfkc", out) not in _SAID:
        _SAID.add((what + ":nfkc", out))
        warnings.warn(f"the {what} {shorten(out, 80)} holds compatibility characters "
                      "(full-width letters, ligatures, super/subscripts) that tokenise "
                      f"differently from {shorten(plain, 80)}; kept as given. Pass "
                      f"{shorten(plain, 80)} if that is what you mean "
                      "(unicodedata.normalize('NFKC', text))", UserWarning, stacklevel=3)
    return out


def _pair_of(x, i: int, what: str) -> tuple[str, str]:
    if isinstance(x, Mapping):
        if "prompt" in x and "answer" in x:
            return x["prompt"], x["answer"]
        raise ValueError(f"{what} {i} is a dict with keys {sorted(map(str, x))}: give "
                         "{'prompt': …, 'answer': …} (the .jsonl shape) or a (prompt, answer) "
                         "tuple")  # fmt: skip
    if hasattr(x, "prompt") and hasattr(x, "answer"):
        return x.prompt, x.answer
    if isinstance(x, tuple | list) and len(x) == 2:
        return x[0], x[1]
    raise TypeError(f"{what} {i} must be a (prompt, answer) pair, a dict {{'prompt': …, "
                    f"'answer': …}} or have .prompt/.answer; got {shorten(str(x), 120)}")


def as_pairs(pairs, template=None, what: str = "fine-tuning pair") -> list[tuple[str, str]]:
    """Fine-tuning pairs as (prompt, answer) tuples of strings. Accepts (prompt, answer)
    tuples or lists, dicts {"prompt": …, "answer": …} (what `read_pairs` reads from a .jsonl
    line; a dict was once unpacked to its keys) and objects with .prompt/.answer. Refuses,
    naming the pair by its 1-based number, a dict without those keys, non-strings, an empty
    prompt or an empty answer, and — with `template` — a prompt that is only the template's
    scaffold ('Question:')."""
    if isinstance(pairs, str | bytes):
        raise TypeError(f"{what}s must be a list of (prompt, answer) pairs, not a string")
    if isinstance(pairs, Mapping):
        raise TypeError(f"{what}s must be a list of (prompt, answer) pairs or of dicts "
                        "{'prompt': …, 'answer': …}; got one dict (for a dict prompt → answer "
                        "pass list(d.items()))")  # fmt: skip
    out = []
    for i, x in enumerate(pairs, 1):
        p, a = _pair_of(x, i, what)
        if not isinstance(p, str) or not isinstance(a, str):
            raise TypeError(f"{what} {i}: prompt and answer must be strings, got "
                            f"({type(p).__name__}, {type(a).__name__})")  # fmt: skip
        if not p.strip(INVISIBLE):
            raise ValueError(f"{what} {i} ({shorten(p, 60)}, {shorten(a, 60)}) has an empty "
                             "prompt: drop the pair or give its question")  # fmt: skip
        if not a.strip(INVISIBLE):
            raise ValueError(f"{what} {i} ({shorten(p, 80)}, {shorten(a, 60)}) has an empty "
                             "answer, so it has no tokens to fit H_ft on: drop the pair or give "
                             "its answer")  # fmt: skip
        if template is not None:
            try:
                template.as_prompt(p)
            except ValueError as e:
                raise ValueError(f"{what} {i}: {e}") from None
        out.append((p, a))
    if not out:
        raise ValueError(f"no {what}s given: H_ft needs fine-tuning data.")
    return out


class UnknownDocumentError(KeyError):
    """A document id the Attributor does not hold (a KeyError with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def prepare_documents(documents: Sequence) -> tuple[list[tuple[str, str]], list[str]]:
    """(kept documents, ids of the dropped ones): (doc_id, text) pairs (or dicts {"id",
    "text"}) with the empty and whitespace-only ones dropped, with a warning that names the
    first dropped ids. Keep the dropped ids for `unknown_document`."""
    if isinstance(documents, str | bytes | Mapping):
        raise TypeError("documents must be a list of (doc_id, text) pairs, e.g. "
                        "read_documents('corpus.jsonl')")  # fmt: skip
    docs = []
    for i, x in enumerate(documents, 1):
        if isinstance(x, Mapping) and "id" in x and "text" in x:
            x = (x["id"], x["text"])
        if not (isinstance(x, tuple | list) and len(x) == 2 and isinstance(x[1], str)):
            raise TypeError(f"document {i} must be a (doc_id, text) pair of strings, got "
                            f"{shorten(str(x), 120)} (a list of texts: "
                            "[(str(i), t) for i, t in enumerate(texts)])")  # fmt: skip
        docs.append((str(x[0]), x[1]))
    kept = [(d, t) for d, t in docs if t.strip(INVISIBLE)]
    dropped = [d for d, t in docs if not t.strip(INVISIBLE)]
    if dropped:
        names = ", ".join(map(repr, dropped[:5])) + (", …" if len(dropped) > 5 else "")
        warnings.warn(f"dropped {len(dropped)} empty or whitespace-only documents ({names}): "
                      "they have no tokens to attribute", UserWarning, stacklevel=3)
    return kept, dropped


def unknown_document(doc_id, dropped: Sequence[str] = (), n_documents: int | None = None
                     ) -> UnknownDocumentError:  # fmt: skip
    """The error for an id the Attributor does not hold: says so when it was dropped as
    empty (`prepare_documents`), else names where ids come from."""
    if doc_id in set(dropped):
        return UnknownDocumentError(
            f"document {doc_id!r} was dropped when the Attributor was built: it is empty or "
            "whitespace-only, so it has no tokens to score. Leave it out of doc_ids (att.doc_ids "
            "lists the documents kept).")
    held = "" if n_documents is None else f" (it holds {n_documents} documents)"
    return UnknownDocumentError(
        f"unknown document id {doc_id!r}: not in the Attributor's corpus{held}; pass ids from "
        "att.doc_ids (a document longer than the context is split into <id>#1, <id>#2, … by "
        "chunk_documents)")


def check_top_k(k, name: str = "k") -> int:
    """k as an int >= 1 (numpy integers too); refuses 2.5, '5', True, 0."""
    if isinstance(k, bool):
        raise TypeError(f"{name} must be a whole number of documents (an int >= 1), got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"{name} must be a whole number of documents (an int >= 1), got "
                        f"{k!r} ({type(k).__name__}); e.g. {name}=5") from None
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return k


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices of `lengths` from shortest to longest (stable): batches formed in this order
    pad each sequence to a similar length, so a pass over documents of mixed lengths
    computes ~1/3 fewer positions (the real corpus, batches of 16: 10,182 → 6,772)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])
