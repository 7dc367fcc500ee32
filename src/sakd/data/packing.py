"""Pack tokenized documents into windows covering the same characters for student and teacher; collate."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from sakd.data.align import alignment_groups
from sakd.data.batch import IGNORE_INDEX, Alignment, Batch, Side
from sakd.data.tokenize import InputFormat, TokenizedDoc

log = logging.getLogger(__name__)


@dataclass
class Window:
    """One training example: consecutive tokens of the document stream, the same characters on both sides.

    `student_ids`, `student_bytes` (UTF-8 bytes each token covers), `student_group` (alignment group of each
    token, 0..G-1 within the window): (Ls,) int64. The `teacher_*` arrays are (Lt,) likewise, or None when
    packing for one tokenizer. `index` is the window's position in the packed list; `teacher_start` is where
    its first teacher token stands in the teacher's stream of kept documents (-1 without a teacher side).
    With chat data, `student_target` / `teacher_target` (L,) bool say which tokens carry the loss (None: all)
    and tokens outside assistant content have group -1.
    """

    student_ids: np.ndarray
    student_bytes: np.ndarray
    student_group: np.ndarray
    teacher_ids: np.ndarray | None
    teacher_bytes: np.ndarray | None
    teacher_group: np.ndarray | None
    index: int
    teacher_start: int = -1
    student_target: np.ndarray | None = None
    teacher_target: np.ndarray | None = None


@dataclass
class _Stream:
    """One model's tokens over all documents, cut into units: alignment groups, and (chat data) the runs of
    prompt and end-of-turn tokens between them, which are kept whole but aligned to nothing."""

    ids: np.ndarray  # (N,)
    nbytes: np.ndarray  # (N,)
    group_sizes: np.ndarray  # (G,) tokens in each unit (0 where a unit has none on this side)
    group_starts: np.ndarray  # (G + 1,) stream index where each unit starts, then N
    aligned: np.ndarray  # (G,) bool: the unit is an alignment group
    target: np.ndarray | None  # (N,) bool: the token carries the loss; None: every token does

    @classmethod
    def of(
        cls, docs: list[TokenizedDoc], group_sizes: np.ndarray, aligned: np.ndarray | None = None
    ) -> _Stream:
        ids = np.concatenate([doc.ids for doc in docs]) if docs else np.zeros(0, dtype=np.int64)
        nbytes = np.concatenate([doc.nbytes for doc in docs]) if docs else np.zeros(0, dtype=np.int64)
        group_starts = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
        aligned = np.ones(len(group_sizes), dtype=bool) if aligned is None else aligned
        target = None
        if any(doc.target is not None for doc in docs):
            target = np.concatenate(
                [doc.target if doc.target is not None else np.ones(len(doc), bool) for doc in docs]
            )
        return cls(ids, nbytes, group_sizes, group_starts, aligned, target)

    def window(self, first_group: int, end_group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, nbytes, group index within the window, -1 outside groups) of units [first_group, end_group),
        (L,) each."""
        start, stop = self.group_starts[first_group], self.group_starts[end_group]
        sizes = self.group_sizes[first_group:end_group]
        aligned = self.aligned[first_group:end_group]
        group = np.repeat(np.where(aligned, np.cumsum(aligned) - 1, -1).astype(np.int64), sizes)
        return self.ids[start:stop], self.nbytes[start:stop], group

    def window_target(self, first_group: int, end_group: int) -> np.ndarray | None:
        if self.target is None:
            return None
        return self.target[self.group_starts[first_group] : self.group_starts[end_group]]


def pack_windows(
    student_docs: list[TokenizedDoc], teacher_docs: list[TokenizedDoc] | None, max_length: int
) -> list[Window]:
    """Cut the stream of documents (each ending with its EOS) into windows.

    Windows may span documents; they are consecutive and do not overlap. Without teacher documents every
    token is its own group, so windows hold exactly `max_length` tokens (the last one fewer). With them, the
    student's windows are the same, and each teacher window holds the whole alignment groups inside its
    student window (`_student_length_windows`). A window with fewer than 2 tokens on either side (nothing to
    predict) is dropped, and so is a document without tokens on one side.

    Chat documents (with `target`) are aligned on their assistant content only, and a window starts at a
    conversation's start unless the conversation alone is longer than `max_length` (it is then cut at group
    boundaries; the number of such conversations is logged). Their windows are cut at alignment group
    boundaries, with at most `max_length` tokens on each side; a group longer than that on either side is
    dropped, and the windows before and after it stop and start there.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    streams, doc_units = _streams(student_docs, teacher_docs)
    doc_starts = None
    if any(doc.target is not None for doc in student_docs):  # chat data: conversations stay whole
        doc_starts = np.cumsum([0, *doc_units])[:-1]
        longest = [
            max(len(s), len(t)) for s, t in zip(student_docs, teacher_docs or student_docs, strict=True)
        ]
        log.info(
            "%d of %d conversations are longer than %d tokens: cut at group boundaries",
            sum(n > max_length for n in longest),
            len(longest),
            max_length,
        )

    if teacher_docs is not None and doc_starts is None:
        return _student_length_windows(streams, max_length)
    windows: list[Window] = []
    for first_group, end_group in _window_spans(streams, max_length, doc_starts):
        parts = [stream.window(first_group, end_group) for stream in streams]
        if any(len(ids) < 2 for ids, _, _ in parts):
            continue
        targets = [stream.window_target(first_group, end_group) for stream in streams]
        teacher_part = parts[1] if len(parts) == 2 else (None, None, None)
        start = int(streams[1].group_starts[first_group]) if len(parts) == 2 else -1
        windows.append(
            Window(
                *parts[0],
                *teacher_part,
                index=len(windows),
                teacher_start=start,
                student_target=targets[0],
                teacher_target=targets[1] if len(targets) == 2 else None,
            )
        )
    return windows


def _student_length_windows(streams: list[_Stream], max_length: int) -> list[Window]:
    """Plain documents with a teacher: the student's windows are the ones it gets alone (`max_length`
    consecutive tokens, the last fewer), so a distilled run and one trained alone see the same tokens in the
    same order, and distillation costs the student none of its data. The teacher's window holds the whole
    alignment groups inside the student's, up to `max_length` tokens. The student tokens of a group that the
    window's edge cuts (or that lies past the teacher's `max_length`) belong to no group: they learn from the
    LM loss alone, and so do those of leading groups longer than `max_length` on the teacher's side. A
    window whose teacher side would hold fewer than 2 tokens (text the tokenizers never cut at the same
    character for a whole window) is dropped."""
    student, teacher = streams
    windows: list[Window] = []
    for start in range(0, len(student.ids), max_length):
        stop = min(start + max_length, len(student.ids))
        if stop - start < 2:  # a lone last token predicts nothing
            continue
        first = int(np.searchsorted(student.group_starts, start, side="left"))  # first whole group
        end = int(np.searchsorted(student.group_starts, stop, side="right")) - 1  # after the last whole one
        while first < end and teacher.group_sizes[first] > max_length:  # too long for the teacher's side
            first += 1
        teacher_end = np.searchsorted(teacher.group_starts, teacher.group_starts[first] + max_length, "right")
        end = max(first, min(end, int(teacher_end) - 1))
        teacher_ids, teacher_bytes, teacher_group = teacher.window(first, end)
        if len(teacher_ids) < 2:
            continue
        group = np.full(stop - start, -1, dtype=np.int64)
        inside = slice(student.group_starts[first] - start, student.group_starts[end] - start)
        group[inside] = student.window(first, end)[2]
        windows.append(
            Window(
                student.ids[start:stop],
                student.nbytes[start:stop],
                group,
                teacher_ids,
                teacher_bytes,
                teacher_group,
                index=len(windows),
                teacher_start=int(teacher.group_starts[first]),
            )
        )
    return windows


def _streams(
    student_docs: list[TokenizedDoc], teacher_docs: list[TokenizedDoc] | None
) -> tuple[list[_Stream], list[int]]:
    """Each side's stream of the documents kept (those with tokens on both sides), and the number of units
    in each document."""
    if teacher_docs is None:
        sizes = np.ones(sum(len(doc) for doc in student_docs), dtype=np.int64)
        return [_Stream.of(student_docs, sizes)], [len(doc) for doc in student_docs]
    if len(teacher_docs) != len(student_docs):
        raise ValueError(f"{len(teacher_docs)} teacher documents for {len(student_docs)} student documents")
    pairs = [(s, t) for s, t in zip(student_docs, teacher_docs, strict=True) if len(s) and len(t)]
    units = [_doc_units(s, t) for s, t in pairs]
    empty = np.zeros(0, dtype=np.int64)
    student_sizes, teacher_sizes, aligned = (
        np.concatenate([empty, *(u[i] for u in units)]) for i in range(3)
    )
    streams = [
        _Stream.of([s for s, _ in pairs], student_sizes, aligned.astype(bool)),
        _Stream.of([t for _, t in pairs], teacher_sizes, aligned.astype(bool)),
    ]
    return streams, [len(u[0]) for u in units]


def _doc_units(
    student_doc: TokenizedDoc, teacher_doc: TokenizedDoc
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One document's units: student (U,) and teacher (U,) token counts, and (U,) whether each is an
    alignment group. A plain document is all alignment groups; a chat document aligns the tokens of its
    assistant content (by their ends in the concatenated contents) and keeps each run of other tokens
    between them as one unaligned unit."""
    if student_doc.content_ends is None or teacher_doc.content_ends is None:
        teacher_group_ends, student_group_ends = alignment_groups(teacher_doc.ends, student_doc.ends)
        student_sizes = np.diff(student_group_ends, prepend=0)
        return student_sizes, np.diff(teacher_group_ends, prepend=0), np.ones(len(student_sizes), dtype=bool)
    student_index = np.flatnonzero(student_doc.content_ends >= 0)  # (Cs,) the content tokens
    teacher_index = np.flatnonzero(teacher_doc.content_ends >= 0)  # (Ct,)
    teacher_group_ends, student_group_ends = alignment_groups(
        teacher_doc.content_ends[teacher_index], student_doc.content_ends[student_index], final_eos=False
    )
    sides = []
    for index, group_ends, n in (
        (student_index, student_group_ends, len(student_doc)),
        (teacher_index, teacher_group_ends, len(teacher_doc)),
    ):
        # a group never spans two contents (each content's end is a boundary on both sides), so its tokens
        # are consecutive in the document
        first = index[np.concatenate([[0], group_ends[:-1]])] if len(group_ends) else group_ends
        stop = index[group_ends - 1] + 1 if len(group_ends) else group_ends
        gaps = first - np.concatenate([[0], stop[:-1]]) if len(group_ends) else group_ends
        final_gap = n - (stop[-1] if len(stop) else 0)
        sides.append(np.append(np.stack([gaps, stop - first], axis=1).reshape(-1), final_gap))
    aligned = np.append(np.tile([False, True], len(student_group_ends)), False)
    keep = (sides[0] > 0) | (sides[1] > 0)
    return sides[0][keep].astype(np.int64), sides[1][keep].astype(np.int64), aligned[keep]


def _window_spans(
    streams: list[_Stream], max_length: int, doc_starts: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """Greedy [first_group, end_group) spans that hold at most max_length tokens in every stream; with
    `doc_starts` (the first unit of each document) a span that would end inside a document that started
    after its own start ends where that document starts instead."""
    num_groups = len(streams[0].group_sizes)
    spans = []
    first_group = 0
    while first_group < num_groups:
        end_group = min(
            int(np.searchsorted(s.group_starts, s.group_starts[first_group] + max_length, side="right")) - 1
            for s in streams
        )
        if doc_starts is not None and end_group < num_groups:
            doc_start = int(doc_starts[np.searchsorted(doc_starts, end_group, side="right") - 1])
            end_group = doc_start if doc_start > first_group else end_group
        if end_group == first_group:  # this group alone is longer than max_length: drop it
            first_group += 1
            continue
        spans.append((first_group, end_group))
        first_group = end_group
    return spans


def _collate_side(windows: list[Window], role: str, side: InputFormat) -> Side:
    """Pad one model's (`role`: "student" or "teacher") windows after its prefix tokens; labels are already
    shifted (position i predicts the token at i + 1). The prefix predicts nothing and belongs to no group
    (label -100, group -1); a token that is not a target (chat prompt) is no label either."""
    ids, nbytes, groups, targets = (
        [getattr(w, f"{role}_{field}") for w in windows] for field in ("ids", "bytes", "group", "target")
    )
    start = len(side.prefix)
    batch_size, length = len(ids), start + max((len(x) for x in ids), default=0)
    input_ids = np.full((batch_size, length), side.pad_id, dtype=np.int64)  # (B, L)
    input_ids[:, :start] = side.prefix
    attention_mask = np.zeros((batch_size, length), dtype=np.int64)  # (B, L)
    labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int64)  # (B, L)
    target_bytes = np.zeros((batch_size, length), dtype=np.int64)  # (B, L)
    group = np.full((batch_size, length), -1, dtype=np.int64)  # (B, L)
    for b, (window_ids, window_bytes, window_group, target) in enumerate(
        zip(ids, nbytes, groups, targets, strict=True)
    ):
        stop = start + len(window_ids)
        input_ids[b, start:stop] = window_ids
        attention_mask[b, :stop] = 1
        keep = np.ones(len(window_ids) - 1, dtype=bool) if target is None else target[1:]
        labels[b, start : stop - 1] = np.where(keep, window_ids[1:], IGNORE_INDEX)
        target_bytes[b, start : stop - 1] = np.where(keep, window_bytes[1:], 0)
        group[b, start:stop] = window_group
    arrays = input_ids, attention_mask, labels, target_bytes, group
    return Side(*(torch.from_numpy(a) for a in arrays))


def group_last_positions(group: np.ndarray) -> np.ndarray:
    """(G,) int64: the position of the last token of each group, for a window's (L,) group indices (-1: a
    token outside every group)."""
    return np.flatnonzero(np.append(group[1:] != group[:-1], True) & (group >= 0))


def collate_windows(
    windows: list[Window], student: InputFormat | int, teacher: InputFormat | int | None
) -> Batch:
    """Stack windows into a padded `Batch` of long tensors.

    `student`, `teacher`: each model's `InputFormat` (or just its padding id, for a model that takes no
    special tokens): every row starts with that model's prefix tokens, then the window's tokens, then padding.
    Per model (`Batch.student`, and `Batch.teacher` when the windows have a teacher side): `input_ids`,
    `attention_mask`, `labels` (-100 at the last real position and at padding), `target_bytes` (UTF-8 bytes
    of each label token, 0 where there is no label), `group` (-1 at padding): (B, L). With a teacher side,
    `Batch.alignment`: `student_pos` and `teacher_pos` (B, G) hold the last position of each group on each
    side, and `mask` (B, G) bool is True for real groups followed on both sides by the next group (so both
    next tokens, which start at the same character, are in the window: not the window's last group, nor the
    last of an assistant content in chat data); padding groups point at 0.
    `window_index` (B,). An empty list gives zero-sized tensors, with a teacher side if `teacher` is given.
    """
    has_teacher = windows[0].teacher_ids is not None if windows else teacher is not None
    if has_teacher and teacher is None:
        raise ValueError("the windows have a teacher side: pass the teacher's input format")
    student, teacher = _input_format(student), _input_format(teacher)
    student_side = _collate_side(windows, "student", student)
    teacher_side = alignment = None
    if has_teacher:
        teacher_side = _collate_side(windows, "teacher", teacher)
        alignment = _collate_alignment(windows, len(student.prefix), len(teacher.prefix))
    window_index = torch.tensor([w.index for w in windows], dtype=torch.int64)  # (B,)
    return Batch(student_side, window_index, teacher_side, alignment)


def _input_format(side: InputFormat | int | None) -> InputFormat | None:
    return InputFormat(pad_id=side) if isinstance(side, int) else side


def _collate_alignment(windows: list[Window], student_shift: int, teacher_shift: int) -> Alignment:
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
        window = windows[b]
        mask[b, :groups] = _followed(window.student_group, student_positions - student_shift) & _followed(
            window.teacher_group, teacher_positions - teacher_shift
        )
    return Alignment(torch.from_numpy(mask), torch.from_numpy(student_pos), torch.from_numpy(teacher_pos))


def _followed(group: np.ndarray, last: np.ndarray) -> np.ndarray:
    """(G,) bool: whether the token after each group's last one (positions `last` in the window) starts the
    next group."""
    after = np.append(group, -1)[last + 1]
    return after == np.arange(1, len(last) + 1)
