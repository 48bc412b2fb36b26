"""Text → token batches for attribution, without a model pair (notebook 07 §Fact tracing).

A document is a training example on every next token, `text + eos`; a question/answer pair
is `template.as_prompt(question) + joiner + answer + eos` with the loss on the answer tokens
only: the same encoding for the fine-tuning pairs H_ft is fitted on and for the queries
m(q) = −log p(answer | prompt). Benchmarks that only tokenise build an `Encoder` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from msif_lite.attribution.checks import check_fits_context, context_length
from msif_lite.engine.gradstore import Candidate
from msif_lite.engine.inputs import INVISIBLE
from msif_lite.engine.prompts import DEFAULT_TEMPLATE, PromptTemplate, encode_document
from msif_lite.engine.tasks import IGNORE_INDEX, TokenBatch, make_token_batch


class QuestionLike(Protocol):
    prompt: str
    answer: str


@dataclass(frozen=True)
class Encoder:
    """Tokenises documents and question/answer pairs into `Candidate`s and batches."""

    tokenizer: object
    template: PromptTemplate = DEFAULT_TEMPLATE
    context: int = 1024  # longest sequence in tokens
    context_source: str = "Encoder.context"
    batch_size: int = 16

    @classmethod
    def for_model(cls, model, tokenizer, template: PromptTemplate = DEFAULT_TEMPLATE,
                  context: int | None = None, batch_size: int = 16) -> Encoder:  # fmt: skip
        """The encoder of `model`: its position limit unless `context` is given."""
        n, source = context_length(model, tokenizer, context)
        return cls(tokenizer, template, n, source, batch_size)

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pid is None else pid

    def document(self, doc_id: str, text: str) -> Candidate:
        """A document as a training example: text + eos, loss on every next token."""
        ids, labels = encode_document(self.tokenizer, text)
        check_fits_context(len(ids), self.context, f"document {doc_id!r}",
                           "split long documents into context-length chunks first with "
                           "msif_lite.scale.pairs.chunk_documents(documents, tokenizer, "
                           f"{self.context}) (ids doc#1, doc#2, …), or pass "
                           "AttributionConfig(context_length=…) for a model without a "
                           f"position limit (now from {self.context_source})")  # fmt: skip
        return Candidate(doc_id, tuple(ids), tuple(labels))

    def qa_example(self, prompt: str, answer: str) -> Candidate:
        """template.as_prompt(prompt) + joiner + answer + eos with the loss on the answer
        tokens only (`AttributionConfig.template`: the same for H_ft's pairs and queries)."""
        if not prompt.strip():
            raise ValueError("a question is empty: pass a question such as 'Where was X born?'")
        prompt = self.template.as_prompt(prompt)
        ids, labels = self.template.encode(self.tokenizer, prompt, answer)
        check_fits_context(len(ids), self.context, f"the question/answer {prompt!r}",
                           "shorten the question or the answer")
        answer_ids = [t for t in labels if t != IGNORE_INDEX][:-1]  # without the final eos
        special = set(self.tokenizer.all_special_ids)
        content = [t for t in answer_ids
                   if t not in special and self.tokenizer.decode([t]).strip(INVISIBLE)]
        if not answer.strip(INVISIBLE) or not content:
            raise ValueError(f"the answer {answer!r} is only special tokens or invisible "
                             "characters: give each question a real answer.")  # fmt: skip
        return Candidate(prompt, tuple(ids), tuple(labels))

    def collate(self, examples: Sequence[Candidate]) -> TokenBatch:
        """Right-padded batch; the loss mask follows each example's labels."""
        masks = [[lab != IGNORE_INDEX for lab in c.labels] for c in examples]
        return make_token_batch([c.input_ids for c in examples], self.pad_id, masks)

    def batches(self, examples: Sequence[Candidate]) -> list[TokenBatch]:
        """`batch_size` examples per batch, in the given order."""
        b = self.batch_size
        return [self.collate(examples[i : i + b]) for i in range(0, len(examples), b)]

    def query_batch(self, questions: Sequence[QuestionLike]) -> TokenBatch:
        """The questions as one TokenBatch (template, loss on the answer tokens)."""
        return self.collate([self.qa_example(q.prompt, q.answer) for q in questions])
