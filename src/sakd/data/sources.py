"""Data sources -> examples: `.txt` files, `.jsonl` files, folders of both, and Hugging Face datasets.

An example is a text document (a string) or a chat / prompt-completion row (`sakd.data.formats`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sakd.data.formats import FORMATS, Example, detect_format, parse_row
from sakd.errors import UserError

DataSource = str | os.PathLike | Mapping[str, Any]
"""A path (file or folder), a mapping `{"hf": NAME, ...}` or `{"path": P, "format": F}`; an object with those
attributes also works."""

FILE_SUFFIXES = (".txt", ".jsonl")


def load_documents(source: DataSource, *, setting: str = "data.train") -> list[Example]:
    """Read one source into examples; `setting` names the config key to fix in error messages.

    Text documents that are empty or whitespace only are skipped. Raises `UserError` for a missing path, an
    unreadable or malformed file or row, an unloadable dataset, or a source without any non-empty example.
    """
    if isinstance(source, (str, os.PathLike)):
        documents = _path_documents(Path(source), setting, None)
        shown = str(source)
    elif _spec_field(source, "path", None) is not None:
        shown = str(_spec_field(source, "path", None))
        documents = _path_documents(Path(shown), setting, _format(source, setting))
    else:
        documents = _dataset_documents(source, setting)
        shown = str(_spec_field(source, "hf", None))
    if not documents:
        raise UserError(f"data source '{shown}' holds no non-empty documents: check {setting}")
    return documents


def load_sources(sources: Sequence[DataSource] | DataSource, *, setting: str = "data.train") -> list[Example]:
    """Concatenate `load_documents` over a list of sources (a single source is accepted as well)."""
    if isinstance(sources, (str, os.PathLike, Mapping)) or not isinstance(sources, Sequence):
        sources = [sources]
    documents = [document for source in sources for document in load_documents(source, setting=setting)]
    if not documents:
        raise UserError(f"no data sources given: list at least one file, folder or dataset in {setting}")
    return documents


def _format(spec: Any, setting: str) -> str | None:
    fmt = _spec_field(spec, "format", None)
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"data format {fmt!r} is unknown: use one of {', '.join(FORMATS)} in {setting}")
    return fmt


def _path_documents(path: Path, setting: str, fmt: str | None) -> list[Example]:
    if not path.exists():
        raise UserError(
            f"data source '{path}' does not exist: check {setting} "
            "(for a Hugging Face dataset write {hf: NAME})"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise UserError(f"data folder '{path}' holds no .txt or .jsonl files: check {setting}")
        return [document for file in files for document in _file_documents(file, setting, fmt)]
    return _file_documents(path, setting, fmt)


def _file_documents(path: Path, setting: str, fmt: str | None) -> list[Example]:
    if path.suffix not in FILE_SUFFIXES:
        raise UserError(
            f"data file '{path}' has an unsupported type: "
            f"use .txt, .jsonl, a folder or {{hf: NAME}} in {setting}"
        )
    try:
        text = path.read_bytes().decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
        raise UserError(
            f"data file '{path}' is not valid UTF-8 (byte {error.start}): convert it to UTF-8"
        ) from None
    except OSError as error:
        raise UserError(f"data file '{path}' cannot be read ({error.strerror}): check {setting}") from None
    if path.suffix == ".txt":
        if fmt not in (None, "text"):
            raise UserError(f"data file '{path}' is plain text: it cannot hold {fmt} rows (use .jsonl)")
        return [text] if text.strip() else []
    return _jsonl_documents(path, text, fmt)


def _jsonl_documents(path: Path, text: str, fmt: str | None) -> list[Example]:
    documents = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"data file '{path}' line {line_number} is not valid JSON ({error.msg}): fix it"
            ) from None
        example = parse_row(record, f"data file '{path}' line {line_number}", fmt)
        if example is not None:
            documents.append(example)
    return documents


def _spec_field(spec: Any, name: str, default: Any) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name, default)
    return getattr(spec, name, default)


def _dataset_documents(spec: Any, setting: str) -> list[Example]:
    name = _spec_field(spec, "hf", None)
    if not name:
        raise UserError(f"data source {spec!r} is neither a path nor {{hf: NAME}}: check {setting}")
    config = _spec_field(spec, "config", None)
    split = _spec_field(spec, "split", None) or "train"
    text_field = _spec_field(spec, "text_field", None) or "text"

    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # any failure to load (name, config, network) is the user's to fix
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"dataset '{name}' (config {config!r}, split {split!r}) could not be loaded ({reason}): "
            f"check {setting} and your network or cache"
        ) from None
    fmt = _format(spec, setting) or detect_format(dict.fromkeys(dataset.column_names), text_field)
    if fmt in ("messages", "prompt_completion"):
        where = f"dataset '{name}' row {{}}"
        rows = (parse_row(row, where.format(i), fmt) for i, row in enumerate(dataset))
        return [row for row in rows if row is not None]
    if text_field not in dataset.column_names:
        raise UserError(
            f"dataset '{name}' has no column '{text_field}' (it has {', '.join(dataset.column_names)}): "
            f"set text_field in {setting}"
        )
    return [text for text in dataset[text_field] if isinstance(text, str) and text.strip()]
