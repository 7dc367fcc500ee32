"""Alignment groups: the shortest spans of text that both tokenizations cut at the same characters."""

from __future__ import annotations

import numpy as np


def alignment_groups(
    teacher_ends: np.ndarray, student_ends: np.ndarray, final_eos: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Group the tokens of two tokenizations of the same text so that each group covers the same characters.

    `teacher_ends` (Nt,), `student_ends` (Ns,): non-decreasing end character offsets of each token.
    Returns `(teacher_group_ends, student_group_ends)`, int64 (G,) each: the exclusive token index at which
    each group ends, so group g holds teacher tokens [teacher_group_ends[g-1], teacher_group_ends[g]) and
    likewise for the student; the last entries are Nt and Ns and every group has at least one token per side.

    A group closes where both tokenizations have a token boundary at the same character. Tokens that share
    an end offset (the byte-level pieces of one character, a metaspace marker with the letter after it)
    form one unit, because the text between them has no character boundary. Two exceptions:
    - identical end offsets (the same tokenizer): every token is its own group;
    - both sequences end with a zero-width token (EOS appended to both): the two final tokens form their
      own group, so that EOS is aligned to EOS and the last text group predicts EOS on both sides
      (unless `final_eos` is False: text that ends in byte pieces of one character on both sides).
    Text left over after the last common boundary joins the last group. Empty input on either side gives
    no groups.
    """
    teacher_ends = np.asarray(teacher_ends, dtype=np.int64)
    student_ends = np.asarray(student_ends, dtype=np.int64)
    num_teacher, num_student = len(teacher_ends), len(student_ends)
    if num_teacher == 0 or num_student == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    if np.array_equal(teacher_ends, student_ends):
        same = np.arange(1, num_teacher + 1, dtype=np.int64)
        return same, same.copy()
    if final_eos and _ends_zero_width(teacher_ends) and _ends_zero_width(student_ends):
        teacher_text_ends, student_text_ends = _text_groups(teacher_ends[:-1], student_ends[:-1])
        return np.append(teacher_text_ends, num_teacher), np.append(student_text_ends, num_student)
    return _text_groups(teacher_ends, student_ends)


def _ends_zero_width(ends: np.ndarray) -> bool:
    return len(ends) >= 2 and ends[-1] == ends[-2]


def _unit_ends(ends: np.ndarray) -> np.ndarray:
    """Indices of the last token of each run of equal end offsets: (U,) int64, with unique end values."""
    return np.flatnonzero(np.append(ends[1:] != ends[:-1], True))


def _text_groups(teacher_ends: np.ndarray, student_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    teacher_units, student_units = _unit_ends(teacher_ends), _unit_ends(student_ends)
    # end values are unique within each list of units, so matching values are the common boundaries
    _, teacher_pick, student_pick = np.intersect1d(
        teacher_ends[teacher_units], student_ends[student_units], assume_unique=True, return_indices=True
    )
    teacher_group_ends = teacher_units[teacher_pick] + 1  # (G,)
    student_group_ends = student_units[student_pick] + 1  # (G,)
    if len(teacher_group_ends) == 0:
        return np.array([len(teacher_ends)], dtype=np.int64), np.array([len(student_ends)], dtype=np.int64)
    teacher_group_ends[-1] = len(teacher_ends)
    student_group_ends[-1] = len(student_ends)
    return teacher_group_ends.astype(np.int64), student_group_ends.astype(np.int64)
