"""Chat and prompt-completion rows -> tokens with loss targets and content offsets, per model.

Each model renders a conversation with its own chat template. The trained assistant contents are located in
that rendering (by rendering once with placeholders in their place), the rendering is tokenized with offsets,
and every token is classified: content (it covers characters of a trained assistant content), end of turn
(the model's own special token closing such a turn, e.g. `<|im_end|>`), or prompt. Content and end-of-turn
tokens carry the loss; only content tokens are aligned between the models, through their ends in the
concatenated contents, which are the same text on both sides whatever the templates put around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sakd.data.formats import Chat, Completion
from sakd.data.tokenize import TokenizedDoc, special_prefix, text_tokenizer, tokenized_doc, utf8_prefix_bytes
from sakd.errors import UserError

# Private-use characters: no template changes them, and no real content holds them.
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclass
class Rendering:
    """A model's text for one example: `content` (K, 2) character spans of the trained assistant contents
    (stripped of surrounding whitespace) and `turn_ends` (K, 2) the span of each one's end-of-turn tokens."""

    text: str
    content: list[tuple[int, int]]
    turn_ends: list[tuple[int, int]]
    eos_is_turn_end: bool = False  # a plain completion: the EOS after it is what ends its turn


def set_chat_template(tokenizer: Any, path: str | None, role: str) -> None:
    """Give `tokenizer` the Jinja chat template in file `path` (nothing for None)."""
    if path is None:
        return
    try:
        tokenizer.chat_template = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(
            f"{role}.chat_template '{path}' cannot be read ({error}): give a Jinja file"
        ) from None


def use_chat_templates(student_tokenizer: Any, teacher_tokenizer: Any | None, cfg: Any) -> None:
    """Set the chat templates that `cfg.student.chat_template` / `cfg.teacher.chat_template` name."""
    set_chat_template(student_tokenizer, cfg.student.chat_template, "student")
    if teacher_tokenizer is not None and cfg.teacher is not None:
        set_chat_template(teacher_tokenizer, cfg.teacher.chat_template, "teacher")


def require_chat_template(tokenizer: Any, role: str, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where} is chat data but the {role} tokenizer has no chat template: "
            f"set {role}.chat_template=PATH (a file holding a Jinja template)"
        )


def render_chat(tokenizer: Any, chat: Chat, role: str) -> Rendering:
    """Render `chat` with the tokenizer's template and locate each trained assistant content in it."""
    require_chat_template(tokenizer, role, chat.where)
    trained = [i for i in range(len(chat.messages)) if chat.trained(i)]
    marked = [
        {**m, "content": f"{_OPEN}{i}{_CLOSE}"} if i in trained else m for i, m in enumerate(chat.messages)
    ]
    try:
        text = tokenizer.apply_chat_template(list(chat.messages), tokenize=False)
        template = tokenizer.apply_chat_template(marked, tokenize=False)
    except Exception as error:  # a template's own raise_exception (e.g. roles out of order) is the data's
        raise UserError(
            f"{chat.where}: the {role} chat template rejects this conversation ({error})"
        ) from None
    # contents written as given, or stripped of surrounding whitespace (as Llama 3's template does)
    for strip in (False, True):
        filled, spans = _fill(template, chat, trained, strip, role)
        if filled == text:
            return _finish(tokenizer, text, spans)
    raise UserError(
        f"{chat.where}: the {role} chat template changes an assistant message's text, so its loss span "
        "cannot be found: use a template that writes assistant content as given"
    )


def _fill(
    template: str, chat: Chat, trained: list[int], strip: bool, role: str
) -> tuple[str, list[tuple[int, int]]]:
    """The placeholder rendering with each trained content put back (stripped when `strip`), and the span
    of each content, without its surrounding whitespace, in the result."""
    parts, spans, cursor, length = [], [], 0, 0
    for i in trained:
        marker = f"{_OPEN}{i}{_CLOSE}"
        at = template.find(marker, cursor)
        if at < 0:
            raise UserError(f"{chat.where}: the {role} chat template drops assistant message {i}")
        content = chat.messages[i]["content"]
        written = content.strip() if strip else content
        length += at - cursor
        start = length + len(written) - len(written.lstrip())
        spans.append((start, start + len(content.strip())))
        parts += [template[cursor:at], written]
        length += len(written)
        cursor = at + len(marker)
    parts.append(template[cursor:])
    return "".join(parts), spans


def _finish(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> Rendering:
    """Drop the BOS the window prefix adds anyway, and trailing whitespace; find the end-of-turn spans."""
    prefix = "".join(tokenizer.convert_ids_to_tokens(list(special_prefix(tokenizer))))
    if prefix and text.startswith(prefix):
        text = text[len(prefix) :]
        spans = [(a - len(prefix), b - len(prefix)) for a, b in spans]
    text = text.rstrip()
    markers = [str(t) for t in tokenizer.added_tokens_decoder.values()]
    return Rendering(text, spans, [_turn_end(text, b, markers) for _, b in spans])


def _turn_end(text: str, end: int, markers: list[str]) -> tuple[int, int]:
    """The span from a content's end through the first special token after it, when only whitespace lies
    between ((end, end) when none follows: a template without end-of-turn tokens)."""
    found = [(at, -len(m), m) for m in markers if m and (at := text.find(m, end)) >= 0]
    if not found:
        return end, end
    at, _, marker = min(found)
    return (end, at + len(marker)) if not text[end:at].strip() else (end, end)


def classify_tokens(
    tokenizer: Any, rendering: Rendering, ids: list[int], offsets: list[tuple[int, int]]
) -> TokenizedDoc:
    """A rendering's tokens (ids and character offsets) with their loss targets and content ends. An EOS
    follows as the separator from the next example unless the text already ends with one; it is a target
    only for a plain completion, which has no other end-of-turn token."""
    doc = tokenized_doc(rendering.text, ids, offsets, None)
    ends = doc.ends
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    content_ends = np.full(len(ends), -1, dtype=np.int64)
    target = np.zeros(len(ends), dtype=bool)
    offset = 0
    for (a, b), (_, turn_end) in zip(rendering.content, rendering.turn_ends, strict=True):
        # a token straddling a content edge counts as content, clamped to it
        inside = (ends > a) & ((starts < b) | (ends == b)) & (content_ends < 0)
        content_ends[inside] = offset + np.minimum(ends[inside], b) - a
        target |= inside | ((ends > b) & (starts < turn_end))
        offset += b - a
    contents = "".join(rendering.text[a:b] for a, b in rendering.content)
    picked = np.flatnonzero(content_ends >= 0)  # content tokens, in order: their bytes follow one another
    nbytes = np.zeros(len(ends), dtype=np.int64)
    nbytes[picked] = np.diff(utf8_prefix_bytes(contents)[content_ends[picked]], prepend=0)
    ids = doc.ids
    eos = tokenizer.eos_token_id
    if eos is not None and not (len(ids) and ids[-1] == eos):
        ids, ends = np.append(ids, eos), np.append(ends, len(rendering.text))
        target, content_ends = np.append(target, rendering.eos_is_turn_end), np.append(content_ends, -1)
        nbytes = np.append(nbytes, 0)
    return TokenizedDoc(ids, ends, nbytes.astype(np.int64), target, content_ends)


def render_example(tokenizer: Any, example: Chat | Completion, role: str) -> Rendering:
    """This model's text for a chat (its template) or a plain prompt and completion (their concatenation)."""
    if isinstance(example, Chat):
        return render_chat(tokenizer, example, role)
    text = (example.prompt + example.completion).rstrip()
    start = len(example.prompt) + len(example.completion) - len(example.completion.lstrip())
    end = start + len(example.completion.strip())
    return Rendering(text, [(start, end)], [(end, end)], eos_is_turn_end=True)


def tokenize_examples(
    tokenizer: Any, examples: list[Chat | Completion], role: str, batch_size: int = 256
) -> list[TokenizedDoc]:
    """Chat and prompt-completion examples as this model's `TokenizedDoc`s (`role` names it in errors),
    rendered one by one and tokenized in batches."""
    backend = text_tokenizer(tokenizer)
    docs = []
    for start in range(0, len(examples), batch_size):
        renderings = [render_example(tokenizer, e, role) for e in examples[start : start + batch_size]]
        encodings = backend.encode_batch([r.text for r in renderings], add_special_tokens=False)
        docs += [
            classify_tokens(tokenizer, r, e.ids, e.offsets)
            for r, e in zip(renderings, encodings, strict=True)
        ]
    return docs


def tokenize_example(tokenizer: Any, example: Chat | Completion, role: str) -> TokenizedDoc:
    """One example as `tokenize_examples` gives it."""
    return tokenize_examples(tokenizer, [example], role)[0]


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The text a model sees for a one-message user prompt, up to where its answer starts (its template with
    the generation prompt), without the BOS the window prefix adds."""
    require_chat_template(tokenizer, "model", "--chat")
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = "".join(tokenizer.convert_ids_to_tokens(list(special_prefix(tokenizer))))
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def turn_end_id(tokenizer: Any) -> int | None:
    """The special token that closes an assistant turn in the tokenizer's template (None when there is none),
    found by rendering a probe conversation."""
    probe = Chat(({"role": "user", "content": "q"}, {"role": "assistant", "content": "answer"}), 0, "probe")
    rendering = render_chat(tokenizer, probe, "model")
    start, end = rendering.turn_ends[0]
    if end == start:
        return None
    return tokenizer.convert_tokens_to_ids(rendering.text[start:end].strip())
