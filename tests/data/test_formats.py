"""Row formats: detected from the fields or forced by the source; malformed rows name their file and line."""

from __future__ import annotations

import json

import pytest

from sakd.data.formats import Chat, Completion
from sakd.data.sources import load_documents
from sakd.errors import UserError

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _jsonl(path, *rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_formats_are_detected_per_row(tmp_path):
    rows = [
        {"messages": MESSAGES},
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": MESSAGES[:1], "completion": MESSAGES[1:]},
        {"text": "plain"},
    ]
    chat, completion, split_chat, text = load_documents(_jsonl(tmp_path / "a.jsonl", *rows))
    assert isinstance(chat, Chat) and chat.messages == tuple(MESSAGES) and chat.train_from == 0
    assert completion == Completion("2+2=", "4", completion.where)
    assert isinstance(split_chat, Chat) and split_chat.train_from == 1
    assert text == "plain"
    assert "line 2" in completion.where


def test_a_forced_format_wins_over_detection(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", {"text": "t", "messages": MESSAGES})
    assert isinstance(load_documents(path)[0], Chat)
    assert load_documents({"path": path, "format": "text"}) == ["t"]
    with pytest.raises(UserError, match="format 'chat' is unknown"):
        load_documents({"path": path, "format": "chat"})


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"body": "x", "id": 3},
            r"line 2 has no string 'text' field and matches no other format \(fields: body, id\)",
        ),
        ({"messages": "hello"}, "line 2: 'messages' must be a non-empty list"),
        ({"messages": [{"content": "hi"}]}, r"line 2: messages\[0\] has no 'role'"),
        (
            {"messages": [MESSAGES[0], {"role": "assistant", "content": " "}]},
            r"messages\[1\] is an empty assistant",
        ),
        ({"messages": MESSAGES[:1]}, "line 2: 'messages' has no assistant turn"),
        ({"prompt": "x", "completion": MESSAGES}, "line 2: 'prompt' and 'completion' must both be strings"),
        ({"prompt": "x", "completion": ""}, "line 2 has an empty 'completion'"),
    ],
)
def test_bad_rows_are_user_errors_naming_file_and_line(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", {"messages": MESSAGES}, row)
    with pytest.raises(UserError, match=message) as raised:
        load_documents(path)
    assert "bad.jsonl" in str(raised.value) and "\n" not in str(raised.value)


def test_hugging_face_rows_with_messages(monkeypatch):
    import datasets

    def fake_load_dataset(name, config, split):
        return datasets.Dataset.from_list([{"messages": MESSAGES}, {"messages": MESSAGES[:1]}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(UserError, match="dataset 'chats' row 1: 'messages' has no assistant turn"):
        load_documents({"hf": "chats"})
