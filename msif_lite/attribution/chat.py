"""Which question/answer template a trace uses, said out loud (issue 24).

Attribution must encode the query m(q) = −log p(answer | prompt) and the fine-tuning pairs
H_ft is fitted on exactly as the fine-tune saw them. The kit fine-tunes with its own plain
template ('Question: {question}\\nAnswer: {answer}', `engine.prompts.DEFAULT_TEMPLATE`), so
that is the honest default even for an instruct model whose tokenizer has a chat template;
`msif-lite trace --template chat` (for a pair fine-tuned in the chat format) turns the
tokenizer's `chat_template` into a `PromptTemplate` instead:

    prefix = everything `apply_chat_template` writes before the user's message,
    suffix = everything after it up to the assistant's turn (add_generation_prompt=True),
    joiner = '' and the answer ends with eos (SmolLM2: <|im_end|>, which closes the turn).

Retrieval (BM25, embeddings, candidate pre-selection) matches the bare question either way:
`PromptTemplate.strip` removes whichever wrapper is used (`query_text`).
"""

from __future__ import annotations

from msif_lite.engine.prompts import DEFAULT_TEMPLATE, PromptTemplate, retrieval_text

CHAT = "chat"
"""The `--template` value that selects the tokenizer's chat template."""
_SLOT = "MSIFQUESTIONSLOT"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt_template(tokenizer) -> PromptTemplate:
    """The tokenizer's chat template as a `PromptTemplate` (one user turn, then the
    assistant's); a clear error when it has none."""
    if not has_chat_template(tokenizer):
        raise ValueError("--template chat: this tokenizer has no chat template "
                         "(tokenizer.chat_template is empty); use the template the model was "
                         "fine-tuned with, e.g. the default 'Question: {question}\\nAnswer: "
                         "{answer}'")  # fmt: skip
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    if text.count(_SLOT) != 1:
        raise ValueError("--template chat: the tokenizer's chat template does not place the "
                         "user's message once in its output; pass the format with --template "
                         "'…{question}…{answer}'")  # fmt: skip
    prefix, suffix = text.split(_SLOT)
    return PromptTemplate(prefix, suffix, "")


def template_note(tokenizer, template: PromptTemplate) -> str:
    """One line: which template the trace encodes questions with, and whether the model's
    chat template is used."""
    shown = template.describe()
    chat = has_chat_template(tokenizer)
    if chat and template == chat_prompt_template(tokenizer):
        return (f"template: the model's chat template (tokenizer.apply_chat_template), "
                f"{shown}; right only if the fine-tune used it too")  # fmt: skip
    if template == DEFAULT_TEMPLATE:
        what = "the kit's plain QA template (the fine-tune's)"
    else:
        what = "the template given (--template), which must be the fine-tune's"
    if chat:
        return (f"template: {what}, {shown}; the model's chat template is not used "
                f"(--template chat uses it)")  # fmt: skip
    return f"template: {what}, {shown}; the tokenizer has no chat template"


def query_text(prompt: str, answer: str | None = None,
               template: PromptTemplate = DEFAULT_TEMPLATE) -> str:  # fmt: skip
    """What the text methods and candidate selection match for a prompt formatted with
    `template` (the kit's, a user's --template or a chat template): the bare question, plus
    the answer when given. Without it, a chat wrapper's words would be matched too."""
    return retrieval_text(template.strip(prompt), answer)
