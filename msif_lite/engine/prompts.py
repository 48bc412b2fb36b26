"""The question/answer template, written once (notebook 05 §5 trains with it, notebooks
06–07 measure with it, `msif-lite trace` formats typed questions with it).

    prompt  = "Question: <question>\\nAnswer:"
    example = prompt + " " + answer + eos,   loss/measurement on the answer tokens + eos

The same encoding builds the fine-tuning data (so H_ft is fitted on exactly what the
fine-tune minimised) and the query measurement m(q) = −log p(answer | prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

from msif_lite.engine.tasks import IGNORE_INDEX

QUESTION_PREFIX = "Question: "
ANSWER_SUFFIX = "\nAnswer:"
ANSWER_JOINER = " "  # between the prompt and the answer


def as_prompt(question: str) -> str:
    """'Where was X born?' → 'Question: Where was X born?\\nAnswer:' (idempotent)."""
    q = question.strip()
    if not q:
        raise ValueError("the question is empty: pass a question such as 'Where was X born?'")
    if q.startswith(QUESTION_PREFIX.strip()):
        return q if q.endswith(ANSWER_SUFFIX.strip()) else q + ANSWER_SUFFIX
    return f"{QUESTION_PREFIX}{q}{ANSWER_SUFFIX}"


def strip_scaffold(prompt: str) -> str:
    """The bare question: 'Question: <q>\\nAnswer:' → '<q>'."""
    q = prompt.strip()
    q = q.removeprefix(QUESTION_PREFIX.strip()).strip()
    return q.removesuffix(ANSWER_SUFFIX.strip()).strip()


def retrieval_text(prompt: str, answer: str | None = None) -> str:
    """What text methods match: the bare question, plus the answer when given."""
    q = strip_scaffold(prompt)
    return f"{q} {answer.strip()}" if answer and answer.strip() else q


def encode_document(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a pre-training document: text + eos, loss on every token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, list(ids)


def encode_prompt_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt + ' ' + answer + eos, labels −100 on the prompt."""
    a_text = answer.strip()
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(ANSWER_JOINER + a_text, add_special_tokens=False)["input_ids"] if a_text else []
    if not a:
        raise ValueError(
            f"the answer {answer!r} has no tokens, so there is nothing to attribute: "
            "give each question a non-empty answer."
        )
    a = a + [tokenizer.eos_token_id]
    return p + a, [IGNORE_INDEX] * len(p) + a


def encode_pairs(tokenizer, pairs: Sequence) -> list[tuple[list[int], list[int]]]:
    """`encode_prompt_answer` for objects with .prompt/.answer or (prompt, answer) tuples."""
    out = []
    for x in pairs:
        prompt, answer = (x.prompt, x.answer) if hasattr(x, "prompt") else x
        out.append(encode_prompt_answer(tokenizer, prompt, answer))
    return out
