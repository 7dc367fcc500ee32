"""The local paths a raw config names (models, tokenizers, chat templates, data), checked before validation
so that a missing file is reported with every other problem of the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def looks_like_path(ref: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (or anything that exists) is a local path."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or Path(ref).exists()


def file_problems(raw: dict[str, Any]) -> list[str]:
    """Local paths that do not exist, read from the raw mapping so that they are reported together with every
    other problem (even when the rest of the config is invalid)."""
    problems = []
    for role in ("student", "teacher"):
        spec = raw.get(role)
        for key in ("model", "tokenizer", "chat_template"):
            ref = spec.get(key) if isinstance(spec, dict) else None
            is_path = key == "chat_template" or (isinstance(ref, str) and looks_like_path(ref))
            if isinstance(ref, str) and ref and is_path and not Path(ref).expanduser().exists():
                problems.append(f"{role}.{key}: '{ref}' does not exist")
    data = raw.get("data")
    for split in ("train", "eval"):
        sources = data.get(split) if isinstance(data, dict) else None
        for src in sources if isinstance(sources, list) else []:
            path = src.get("path") if isinstance(src, dict) else src
            if isinstance(path, str) and not Path(path).expanduser().exists():
                problems.append(f"data.{split}: '{path}' does not exist")
    return problems
