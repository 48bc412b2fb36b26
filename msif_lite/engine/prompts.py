"""The question/answer template, written once (notebook 05 §5 trains with it, notebooks
06–07 measure with it, `msif-lite trace` formats typed questions with it).

    prompt  = prefix + question + suffix        default "Question: <question>\\nAnswer:"
    example = prompt + joiner + answer + eos,   loss/measurement on the answer tokens + eos

`PromptTemplate` is that one setting (`AttributionConfig.template`): the same encoding
builds the fine-tuning examples H_ft is fitted on (so it sees exactly what the fine-tune
minimised) and the query measurement m(q) = −log p(answer | prompt). A model fine-tuned with
another format gets its own template, e.g. `PromptTemplate("### Question:\\n", "\\n### Answer:",
"\\n")`; prompts that are already formatted (`PromptTemplate("", "", " ")`) are used as is.
The module-level helpers are the kit's default template, `DEFAULT_TEMPLATE`.

Questions and answers are normalised to Unicode NFC (`engine.inputs.normalise_text`,
with a warning when that changes them); a question that is only the scaffold ('Question:',
'Question: \\nAnswer:') is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from msif_lite.engine.inputs import normalise_text, shorten
from msif_lite.engine.tasks import IGNORE_INDEX

QUESTION_PREFIX = "Question: "
ANSWER_SUFFIX = "\nAnswer:"
ANSWER_JOINER = " "  # between the prompt and the answer


@dataclass(frozen=True)
class PromptTemplate:
    """prompt = prefix + question + suffix; example = prompt + joiner + answer + eos."""

    prefix: str = QUESTION_PREFIX
    suffix: str = ANSWER_SUFFIX
    joiner: str = ANSWER_JOINER

    def __post_init__(self) -> None:
        for name in ("prefix", "suffix", "joiner"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"PromptTemplate.{name} must be a string, got "
                                f"{getattr(self, name)!r}")  # fmt: skip

    def as_prompt(self, question: str) -> str:
        """'Where was X born?' → prefix + 'Where was X born?' + suffix. Idempotent: a text
        that already starts with the prefix and ends with the suffix (both stripped) is
        kept, so formatted prompts and plain questions can be mixed."""
        q = normalise_text(question, "question").strip()
        if not q:
            raise ValueError("the question is empty: pass a question such as 'Where was X born?'")
        head, tail = self.prefix.strip(), self.suffix.strip()
        if (head or tail) and not self.strip(q):
            raise ValueError(
                f"the question {shorten(question, 80)} is only the template's scaffold "
                f"({self.describe()}), with no question in it: pass a question such as 'Where "
                "was X born?' (or the formatted prompt with the question in it)")
        if q.startswith(head):
            return q if q.endswith(tail) else q + self.suffix
        return f"{self.prefix}{q}{self.suffix}"

    def strip(self, prompt: str) -> str:
        """The bare question: prefix + q + suffix → q."""
        q = prompt.strip().removeprefix(self.prefix.strip()).strip()
        return q.removesuffix(self.suffix.strip()).strip()

    def encode(self, tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of prompt + joiner + answer + eos, labels −100 on the prompt
        (the prompt is tokenised alone, so the answer's tokens do not depend on it)."""
        a_text = normalise_text(answer, "answer").strip()
        prompt = normalise_text(prompt, "question")
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = (tokenizer(self.joiner + a_text, add_special_tokens=False)["input_ids"]
             if a_text else [])  # fmt: skip
        if not a:
            raise ValueError(
                f"the answer {shorten(answer, 80)} has no tokens, so there is nothing to "
                "attribute: give each question a non-empty answer."
            )
        a = a + [tokenizer.eos_token_id]
        return p + a, [IGNORE_INDEX] * len(p) + a

    @classmethod
    def parse(cls, text: str) -> PromptTemplate:
        """From one format string, e.g. 'Question: {question}\\nAnswer: {answer}': the
        prefix is what precedes {question}; between {question} and {answer}, the trailing
        white space is the joiner and the rest the suffix. Nothing may follow {answer}
        (the eos token ends every example)."""
        if text.count("{question}") != 1 or text.count("{answer}") != 1 or (
                text.index("{question}") > text.index("{answer}")):
            raise ValueError(f"a template needs one {{question}} followed by one {{answer}}, "
                             f"e.g. 'Question: {{question}}\\nAnswer: {{answer}}'; got {text!r}")
        prefix, rest = text.split("{question}")
        between, after = rest.split("{answer}")
        if after.strip():
            raise ValueError(f"nothing may follow {{answer}} in a template (got {after!r}): "
                             "every example ends with the eos token")  # fmt: skip
        suffix = between.rstrip()
        return cls(prefix, suffix, between[len(suffix):])

    def describe(self) -> str:
        """The template as one line, e.g. 'Question: {question}\\nAnswer: {answer}'."""
        return repr(f"{self.prefix}{{question}}{self.suffix}{self.joiner}{{answer}}")


DEFAULT_TEMPLATE = PromptTemplate()
"""The kit's template: 'Question: <question>\\nAnswer: <answer><eos>'."""


def as_prompt(question: str) -> str:
    """'Where was X born?' → 'Question: Where was X born?\\nAnswer:' (idempotent)."""
    return DEFAULT_TEMPLATE.as_prompt(question)


def strip_scaffold(prompt: str) -> str:
    """The bare question: 'Question: <q>\\nAnswer:' → '<q>'."""
    return DEFAULT_TEMPLATE.strip(prompt)


def retrieval_text(prompt: str, answer: str | None = None) -> str:
    """What text methods match: the bare question, plus the answer when given."""
    q = normalise_text(strip_scaffold(prompt), "question")
    a = normalise_text(answer, "answer").strip() if answer else ""
    return f"{q} {a}" if a else q


def encode_document(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a pre-training document: text + eos, loss on every token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, list(ids)


def encode_prompt_answer(
    tokenizer, prompt: str, answer: str, template: PromptTemplate = DEFAULT_TEMPLATE
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt + ' ' + answer + eos, labels −100 on the prompt."""
    return template.encode(tokenizer, prompt, answer)


def encode_pairs(
    tokenizer, pairs: Sequence, template: PromptTemplate = DEFAULT_TEMPLATE
) -> list[tuple[list[int], list[int]]]:
    """`encode_prompt_answer` for (prompt, answer) tuples, dicts {"prompt", "answer"} or
    objects with .prompt/.answer (`engine.inputs.as_pairs`)."""
    from msif_lite.engine.inputs import as_pairs

    pairs = list(pairs)
    if not pairs:
        return []
    return [template.encode(tokenizer, p, a) for p, a in as_pairs(pairs, what="pair")]
