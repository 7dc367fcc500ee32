import json
from types import SimpleNamespace

import datasets
import pytest

from sakd.data.sources import load_documents, load_sources
from sakd.errors import UserError


def write_jsonl(path, records) -> None:
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in records) + "\n")


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line — ü\n", encoding="utf-8")
    assert load_documents(path) == ["first line\nsecond line — ü\n"]
    assert load_documents(str(path)) == ["first line\nsecond line — ü\n"]


def test_jsonl_gives_one_document_per_line_and_skips_empty_text(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": "one"}, {"text": ""}, "", {"text": "two", "id": 3}, {"text": "  "}])
    assert load_documents(path) == ["one", "two"]


def test_folder_reads_txt_and_jsonl_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("bz")
    (tmp_path / "a.txt").write_text("a")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "bc1"}, {"text": "bc2"}])
    (tmp_path / "notes.md").write_text("ignored")
    assert load_documents(tmp_path) == ["a", "bc1", "bc2", "bz"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "no non-empty documents"),
        ("blank.jsonl", b'{"text": ""}\n', "no non-empty documents"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "line 2 is not valid JSON"),
        ("field.jsonl", b'{"body": "x"}\n', "line 1 has no string 'text' field"),
        ("latin1.txt", "café".encode("latin-1"), "not valid UTF-8"),
        ("table.csv", b"a,b\n", "unsupported type"),
    ],
)
def test_bad_files_are_user_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as raised:
        load_documents(path)
    assert name in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data source '.*x\.txt' does not exist: check data\.eval"):
        load_documents(tmp_path / "x.txt", setting="data.eval")


def test_folder_without_text_files_is_a_user_error(tmp_path):
    (tmp_path / "notes.md").write_text("ignored")
    with pytest.raises(UserError, match=r"no \.txt or \.jsonl files"):
        load_documents(tmp_path)


def test_hugging_face_dataset_from_mapping_or_object(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"body": ["one", "", "two"], "text": ["x", "y", "z"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = {"hf": "wikitext", "config": "wikitext-2-raw-v1", "split": "validation", "text_field": "body"}
    assert load_documents(spec) == ["one", "two"]
    assert load_documents(SimpleNamespace(hf="wikitext", config=None, split="train", text_field="text")) == [
        "x",
        "y",
        "z",
    ]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("wikitext", None, "train")]
    with pytest.raises(UserError, match="has no column 'content'"):
        load_documents({"hf": "wikitext", "text_field": "content"})


def test_unloadable_dataset_is_a_user_error(monkeypatch):
    def failing_load_dataset(name, config, split):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(UserError, match=r"dataset 'nope' .* could not be loaded .*doesn't exist on the Hub"):
        load_documents({"hf": "nope"})


def test_load_sources_concatenates_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    assert load_sources([tmp_path / "b.jsonl", tmp_path / "a.txt"]) == ["b1", "b2", "a"]
    assert load_sources(tmp_path / "a.txt") == ["a"]
    with pytest.raises(UserError, match="no data sources"):
        load_sources([])
