"""Pack tokenized documents into windows covering the same characters for student and teacher; collate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sakd.data.align import alignment_groups
from sakd.data.tokenize import InputFormat, TokenizedDoc

IGNORE_INDEX = -100


@dataclass
class Window:
    """One training example: consecutive tokens of the document stream, the same characters on both sides.

    `student_ids`, `student_bytes` (UTF-8 bytes each token covers), `student_group` (alignment group of each
    token, 0..G-1 within the window): (Ls,) int64. The `teacher_*` arrays are (Lt,) likewise, or None when
    packing for one tokenizer. `index` is the window's position in the packed list; `teacher_start` is where
    its first teacher token stands in the teacher's stream of kept documents (-1 without a teacher side).
    """

    student_ids: np.ndarray
    student_bytes: np.ndarray
    student_group: np.ndarray
    teacher_ids: np.ndarray | None
    teacher_bytes: np.ndarray | None
    teacher_group: np.ndarray | None
    index: int
    teacher_start: int = -1


@dataclass
class _Stream:
    """One model's tokens over all documents, with where each alignment group starts."""

    ids: np.ndarray  # (N,)
    nbytes: np.ndarray  # (N,)
    group_sizes: np.ndarray  # (G,) tokens in each group
    group_starts: np.ndarray  # (G + 1,) stream index where each group starts, then N

    @classmethod
    def of(cls, docs: list[TokenizedDoc], group_sizes: np.ndarray) -> _Stream:
        ids = np.concatenate([doc.ids for doc in docs]) if docs else np.zeros(0, dtype=np.int64)
        nbytes = np.concatenate([doc.nbytes for doc in docs]) if docs else np.zeros(0, dtype=np.int64)
        group_starts = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
        return cls(ids, nbytes, group_sizes, group_starts)

    def window(self, first_group: int, end_group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, nbytes, group index within the window) of groups [first_group, end_group), (L,) each."""
        start, stop = self.group_starts[first_group], self.group_starts[end_group]
        sizes = self.group_sizes[first_group:end_group]
        group = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        return self.ids[start:stop], self.nbytes[start:stop], group


def pack_windows(
    student_docs: list[TokenizedDoc], teacher_docs: list[TokenizedDoc] | None, max_length: int
) -> list[Window]:
    """Cut the stream of documents (each ending with its EOS) into windows at alignment group boundaries.

    Each window holds at most `max_length` tokens on each side and may span documents; windows are
    consecutive and do not overlap. A group longer than `max_length` on either side (text the tokenizers
    never cut at the same character) is dropped, and the windows before and after it stop and start there.
    A window with fewer than 2 tokens on either side (nothing to predict) is dropped, and so is a document
    without tokens on one side. Without teacher documents every token is its own group, so windows hold
    exactly `max_length` tokens (the last one fewer).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if teacher_docs is None:
        streams = [_Stream.of(student_docs, np.ones(sum(len(doc) for doc in student_docs), dtype=np.int64))]
    else:
        if len(teacher_docs) != len(student_docs):
            raise ValueError(
                f"{len(teacher_docs)} teacher documents for {len(student_docs)} student documents"
            )
        pairs = [(s, t) for s, t in zip(student_docs, teacher_docs, strict=True) if len(s) and len(t)]
        student_docs, teacher_docs = [s for s, _ in pairs], [t for _, t in pairs]
        student_sizes, teacher_sizes = _group_sizes(student_docs, teacher_docs)
        streams = [_Stream.of(student_docs, student_sizes), _Stream.of(teacher_docs, teacher_sizes)]

    windows: list[Window] = []
    for first_group, end_group in _window_spans(streams, max_length):
        parts = [stream.window(first_group, end_group) for stream in streams]
        if any(len(ids) < 2 for ids, _, _ in parts):
            continue
        teacher_part = parts[1] if len(parts) == 2 else (None, None, None)
        start = int(streams[1].group_starts[first_group]) if len(parts) == 2 else -1
        windows.append(Window(*parts[0], *teacher_part, index=len(windows), teacher_start=start))
    return windows


def _group_sizes(
    student_docs: list[TokenizedDoc], teacher_docs: list[TokenizedDoc]
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens in each alignment group over the whole stream: student (G,) and teacher (G,) int64."""
    student_sizes, teacher_sizes = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for student_doc, teacher_doc in zip(student_docs, teacher_docs, strict=True):
        teacher_group_ends, student_group_ends = alignment_groups(teacher_doc.ends, student_doc.ends)
        student_sizes.append(np.diff(student_group_ends, prepend=0))
        teacher_sizes.append(np.diff(teacher_group_ends, prepend=0))
    return np.concatenate(student_sizes), np.concatenate(teacher_sizes)


def _window_spans(streams: list[_Stream], max_length: int) -> list[tuple[int, int]]:
    """Greedy [first_group, end_group) spans that hold at most max_length tokens in every stream."""
    num_groups = len(streams[0].group_sizes)
    spans = []
    first_group = 0
    while first_group < num_groups:
        end_group = min(
            int(np.searchsorted(s.group_starts, s.group_starts[first_group] + max_length, side="right")) - 1
            for s in streams
        )
        if end_group == first_group:  # this group alone is longer than max_length: drop it
            first_group += 1
            continue
        spans.append((first_group, end_group))
        first_group = end_group
    return spans


def _collate_side(
    ids: list[np.ndarray], nbytes: list[np.ndarray], groups: list[np.ndarray], side: InputFormat
) -> dict[str, np.ndarray]:
    """Pad one model's windows after its prefix tokens; labels are already shifted (position i predicts the
    token at i + 1). The prefix predicts nothing and belongs to no group (label -100, group -1)."""
    start = len(side.prefix)
    batch_size, length = len(ids), start + max((len(x) for x in ids), default=0)
    input_ids = np.full((batch_size, length), side.pad_id, dtype=np.int64)  # (B, L)
    input_ids[:, :start] = side.prefix
    attention_mask = np.zeros((batch_size, length), dtype=np.int64)  # (B, L)
    labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int64)  # (B, L)
    target_bytes = np.zeros((batch_size, length), dtype=np.int64)  # (B, L)
    group = np.full((batch_size, length), -1, dtype=np.int64)  # (B, L)
    for b, (window_ids, window_bytes, window_group) in enumerate(zip(ids, nbytes, groups, strict=True)):
        stop = start + len(window_ids)
        input_ids[b, start:stop] = window_ids
        attention_mask[b, :stop] = 1
        labels[b, start : stop - 1] = window_ids[1:]
        target_bytes[b, start : stop - 1] = window_bytes[1:]
        group[b, start:stop] = window_group
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "target_bytes": target_bytes,
        "group": group,
    }


def group_last_positions(group: np.ndarray) -> np.ndarray:
    """(G,) int64: the position of the last token of each group, for a window's (L,) group indices."""
    return np.flatnonzero(np.append(group[1:] != group[:-1], True))


def collate_windows(
    windows: list[Window], student: InputFormat | int, teacher: InputFormat | int | None
) -> dict[str, torch.Tensor]:
    """Stack windows into a padded batch of long tensors.

    `student`, `teacher`: each model's `InputFormat` (or just its padding id, for a model that takes no
    special tokens): every row starts with that model's prefix tokens, then the window's tokens, then padding.
    Per model (prefix `student_`, and `teacher_` when the windows have a teacher side): `input_ids`,
    `attention_mask`, `labels` (-100 at the last real position and at padding), `target_bytes` (UTF-8 bytes
    of each label token, 0 where there is no label), `group` (-1 at padding): (B, L). With a teacher side,
    `align_student_pos` and `align_teacher_pos` (B, G) hold the last position of each group on each side,
    and `align_mask` (B, G) bool is True for real groups that are not their window's last one (so both
    next tokens, which start at the same character, are in the window); padding groups point at 0.
    `window_index` (B,). An empty list gives zero-sized tensors, with teacher keys if `teacher` is given.
    """
    has_teacher = windows[0].teacher_ids is not None if windows else teacher is not None
    if has_teacher and teacher is None:
        raise ValueError("the windows have a teacher side: pass the teacher's input format")
    student, teacher = _input_format(student), _input_format(teacher)
    arrays = {
        f"student_{key}": value
        for key, value in _collate_side(
            [w.student_ids for w in windows],
            [w.student_bytes for w in windows],
            [w.student_group for w in windows],
            student,
        ).items()
    }
    if has_teacher:
        teacher_arrays = _collate_side(
            [w.teacher_ids for w in windows],
            [w.teacher_bytes for w in windows],
            [w.teacher_group for w in windows],
            teacher,
        )
        arrays.update({f"teacher_{key}": value for key, value in teacher_arrays.items()})
        arrays.update(_collate_alignment(windows, len(student.prefix), len(teacher.prefix)))
    arrays["window_index"] = np.array([w.index for w in windows], dtype=np.int64)  # (B,)
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def _input_format(side: InputFormat | int | None) -> InputFormat | None:
    return InputFormat(pad_id=side) if isinstance(side, int) else side


def _collate_alignment(
    windows: list[Window], student_shift: int, teacher_shift: int
) -> dict[str, np.ndarray]:
    """Group ends as batch positions: each side's tokens start after its `*_shift` prefix tokens."""
    student_last = [student_shift + group_last_positions(w.student_group) for w in windows]
    teacher_last = [teacher_shift + group_last_positions(w.teacher_group) for w in windows]
    batch_size, num_groups = len(windows), max((len(x) for x in student_last), default=0)
    student_pos = np.zeros((batch_size, num_groups), dtype=np.int64)  # (B, G)
    teacher_pos = np.zeros((batch_size, num_groups), dtype=np.int64)  # (B, G)
    mask = np.zeros((batch_size, num_groups), dtype=bool)  # (B, G)
    for b, (student_positions, teacher_positions) in enumerate(zip(student_last, teacher_last, strict=True)):
        groups = len(student_positions)
        student_pos[b, :groups] = student_positions
        teacher_pos[b, :groups] = teacher_positions
        mask[b, : max(groups - 1, 0)] = True
    return {"align_student_pos": student_pos, "align_teacher_pos": teacher_pos, "align_mask": mask}
