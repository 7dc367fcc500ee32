"""A sparse map from teacher token ids to student token ids, built once per tokenizer pair.

Each token's surface (what it adds to the text) is recovered with the byte-level / metaspace / byte-fallback
markers removed: a str when it is whole UTF-8 text, bytes when it is only part of a character (a byte-level
or byte-fallback token for one byte of a multi-byte character), None for special tokens and empty text.
A teacher text token maps to the first token of the student's tokenization of its surface, which is what the
student would emit first for that text; if that token's surface is not a prefix of the teacher's (a student
that prepends a space marker or normalises text), and for teacher byte fragments, it maps to the longest
student token whose bytes are a prefix of the teacher's bytes, so a fragment reaches the student's byte token
when the student has byte-level or byte-fallback tokens, and -1 otherwise. Special tokens map to -1, except
that the teacher's EOS maps to the student's EOS: both mean "the document ends here".
"""

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

Surface = str | bytes | None

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class VocabMapping:
    """Teacher -> student vocabulary correspondence.

    teacher_to_student: (V_t,) student id of each teacher token's first student token, -1 where unmappable.
    shared_teacher_ids, shared_student_ids: (S,) one-to-one pairs of tokens with identical surface text (plus
        the EOS pair). A shared token's teacher_to_student entry may differ from its twin: it follows the
        student's tokenization of the text, which need not emit the twin (a metaspace student prepends "▁").
    teacher_vocab_size, student_vocab_size: len() of the tokenizers (model logits may be wider).
    coverage: fraction of teacher tokens mapped.
    """

    teacher_to_student: torch.Tensor
    shared_teacher_ids: torch.Tensor
    shared_student_ids: torch.Tensor
    teacher_vocab_size: int
    student_vocab_size: int
    coverage: float

    def to(self, device: torch.device | str) -> "VocabMapping":
        """A copy with the index tensors on `device` (no copy when already there)."""
        return VocabMapping(
            self.teacher_to_student.to(device),
            self.shared_teacher_ids.to(device),
            self.shared_student_ids.to(device),
            self.teacher_vocab_size,
            self.student_vocab_size,
            self.coverage,
        )

    def save(self, path: str | Path) -> None:
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> "VocabMapping":
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False

    def has_byte_level(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
        if isinstance(node, list):
            return any(has_byte_level(v) for v in node)
        return False

    return has_byte_level(json.loads(backend.to_str()).get("decoder"))


def _decode_after_anchor(tokenizer: Any, ids: list[int]) -> list[str]:
    """Decode each id after an anchor token, so decoders that strip a leading space (metaspace) keep it."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode(
        [[*anchor, i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return [
        text[len(prefix) :]
        if text.startswith(prefix)
        else tokenizer.decode([i], clean_up_tokenization_spaces=False)
        for i, text in zip(ids, decoded, strict=True)
    ]


def _whole_text(data: bytes) -> Surface:
    try:
        return data.decode("utf-8") or None
    except UnicodeDecodeError:
        return data


def token_surfaces(tokenizer: Any) -> list[Surface]:
    """The surface of every id in range(len(tokenizer)): str, bytes (a character fragment) or None."""
    ids = list(range(len(tokenizer)))
    raw = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    byte_level = _is_byte_level(tokenizer)
    decoded = None if byte_level else _decode_after_anchor(tokenizer, ids)
    surfaces: list[Surface] = []
    for i in ids:
        token = raw[i]
        fallback = _BYTE_FALLBACK.fullmatch(token) if token else None
        if token is None or i in special:
            surfaces.append(None)
        elif i in added:
            surfaces.append(added[i] or None)
        elif fallback:
            surfaces.append(bytes([int(fallback.group(1), 16)]))
        elif byte_level and all(char in _UNICODE_TO_BYTE for char in token):
            surfaces.append(_whole_text(bytes(_UNICODE_TO_BYTE[char] for char in token)))
        elif byte_level:
            surfaces.append(tokenizer.decode([i], clean_up_tokenization_spaces=False) or None)
        else:
            surfaces.append(decoded[i] or None)
    return surfaces


def _bytes_index(surfaces: list[Surface]) -> dict[bytes, int]:
    """bytes -> lowest id, preferring whole-text tokens over byte tokens with the same bytes."""
    index: dict[bytes, int] = {}
    for i, surface in enumerate(surfaces):
        if isinstance(surface, str):
            index.setdefault(surface.encode(), i)
    for i, surface in enumerate(surfaces):
        if isinstance(surface, bytes):
            index.setdefault(surface, i)
    return index


def _longest_prefix(target: bytes, index: dict[bytes, int], longest: int) -> int:
    for length in range(min(len(target), longest), 0, -1):
        if target[:length] in index:
            return index[target[:length]]
    return -1


def build_vocab_mapping(teacher_tokenizer: Any, student_tokenizer: Any) -> VocabMapping:
    """Map every teacher token to a student token (see the module docstring). Batched: ~seconds for 150k."""
    teacher = token_surfaces(teacher_tokenizer)
    student = token_surfaces(student_tokenizer)
    student_bytes = [s.encode() if isinstance(s, str) else s for s in student]
    index = _bytes_index(student)
    longest = max(map(len, index), default=0)

    teacher_to_student = [-1] * len(teacher)
    shared: dict[int, int] = {}
    text_ids = [i for i, surface in enumerate(teacher) if isinstance(surface, str)]
    encoded = student_tokenizer(
        [teacher[i] for i in text_ids], add_special_tokens=False, return_attention_mask=False
    )["input_ids"]
    for i, student_ids in zip(text_ids, encoded, strict=True):
        target = teacher[i].encode()
        first = student_ids[0] if student_ids else -1
        first_bytes = student_bytes[first] if 0 <= first < len(student) else None
        if first_bytes and target.startswith(first_bytes):
            teacher_to_student[i] = first
        else:
            teacher_to_student[i] = _longest_prefix(target, index, longest)
        same_text = index.get(target, -1)
        if same_text >= 0 and student[same_text] == teacher[i]:
            shared.setdefault(same_text, i)
    for i, surface in enumerate(teacher):
        if isinstance(surface, bytes):
            teacher_to_student[i] = _longest_prefix(surface, index, longest)

    teacher_eos, student_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if teacher_eos is not None and student_eos is not None:
        teacher_to_student[teacher_eos] = student_eos
        shared[student_eos] = teacher_eos

    pairs = sorted((t, s) for s, t in shared.items())
    mapped = sum(1 for s in teacher_to_student if s >= 0)
    return VocabMapping(
        teacher_to_student=torch.tensor(teacher_to_student, dtype=torch.long),
        shared_teacher_ids=torch.tensor([t for t, _ in pairs], dtype=torch.long),
        shared_student_ids=torch.tensor([s for _, s in pairs], dtype=torch.long),
        teacher_vocab_size=len(teacher),
        student_vocab_size=len(student),
        coverage=mapped / max(len(teacher), 1),
    )
