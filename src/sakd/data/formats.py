"""Row formats of instruction and chat data: `messages`, `prompt` + `completion`, or plain `text`.

A row's format is detected from its fields unless the source forces one. Chat rows become a `Chat` (messages
for the chat templates, and which assistant messages carry the loss); a prompt and completion given as strings
become a `Completion` (plain text, no template); text rows stay strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sakd.errors import UserError

FORMATS = ("messages", "prompt_completion", "text")
ASSISTANT = "assistant"


@dataclass(frozen=True)
class Chat:
    """A conversation: `messages` ({role, content} dicts) and the index of the first message whose assistant
    turns are trained (earlier ones, a prompt's, are context only); `where` names its file and line."""

    messages: tuple[dict[str, str], ...]
    train_from: int
    where: str

    def trained(self, index: int) -> bool:
        """Whether message `index` is an assistant turn that carries the loss."""
        return index >= self.train_from and self.messages[index]["role"] == ASSISTANT


@dataclass(frozen=True)
class Completion:
    """A prompt and its completion as plain strings: the text is prompt + completion, the loss on the latter."""

    prompt: str
    completion: str
    where: str


Example = str | Chat | Completion


def detect_format(record: Mapping[str, Any], text_field: str = "text") -> str | None:
    """The format a row's fields say (None when they match none)."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if text_field in record:
        return "text"
    return None


def parse_row(record: Any, where: str, fmt: str | None = None, text_field: str = "text") -> Example | None:
    """One row as an example (None for empty text); `fmt` forces the format. A row that matches no format or
    holds malformed chat data is a `UserError` naming `where` (file and line) and what to fix."""
    if not isinstance(record, Mapping):
        raise UserError(f"{where} is not a JSON object: write one object per line")
    fmt = fmt or detect_format(record, text_field)
    if fmt is None:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(
            f"{where} has no string '{text_field}' field and matches no other format (fields: {fields}): "
            f"give 'messages', 'prompt' + 'completion' or '{text_field}'"
        )
    if fmt == "text":
        text = record.get(text_field)
        if not isinstance(text, str):
            raise UserError(f"{where} has no string '{text_field}' field: write one JSON object per line")
        return text if text.strip() else None
    if fmt == "messages":
        messages = _messages(record.get("messages"), "messages", where)
        _require_assistant(messages, 0, where, "messages")
        return Chat(messages, 0, where)
    return _prompt_completion(record, where)


def _prompt_completion(record: Mapping[str, Any], where: str) -> Chat | Completion:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise UserError(f"{where} has an empty 'completion': give the text to learn")
        return Completion(prompt, completion, where)
    if isinstance(prompt, str) or isinstance(completion, str):
        raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages")
    prompt_messages = _messages(prompt, "prompt", where)
    completion_messages = _messages(completion, "completion", where)
    _require_assistant(completion_messages, 0, where, "completion")
    return Chat(prompt_messages + completion_messages, len(prompt_messages), where)


def _messages(value: Any, field: str, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{field}' must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise UserError(f"{where}: {field}[{i}] is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise UserError(f"{where}: {field}[{i}] has no 'role': give system, user or assistant")
        if not isinstance(content, str):
            raise UserError(f"{where}: {field}[{i}] ({role}) has no string 'content'")
        if role == ASSISTANT and not content.strip():
            raise UserError(f"{where}: {field}[{i}] is an empty assistant turn: drop it or give its text")
        messages.append({"role": role, "content": content})
    return tuple(messages)


def _require_assistant(messages: tuple[dict[str, str], ...], start: int, where: str, field: str) -> None:
    if not any(m["role"] == ASSISTANT for m in messages[start:]):
        raise UserError(f"{where}: '{field}' has no assistant turn: nothing to learn from")
