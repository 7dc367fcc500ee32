import numpy as np
import pytest
import torch

from sakd.data.align import alignment_groups
from sakd.data.packing import collate_windows, pack_windows
from sakd.data.tokenize import TokenizedDoc, tokenize_documents


@pytest.fixture(scope="module")
def tokenized(documents, byte_level_tokenizer, metaspace_tokenizer):
    """(student docs, teacher docs): a metaspace student and a byte-level teacher."""
    return tokenize_documents(metaspace_tokenizer, documents), tokenize_documents(
        byte_level_tokenizer, documents
    )


def stream(docs: list[TokenizedDoc], field: str) -> list[int]:
    return np.concatenate([getattr(doc, field) for doc in docs]).tolist()


def window_stream(windows, field: str) -> list[int]:
    return np.concatenate([getattr(window, field) for window in windows]).tolist()


@pytest.mark.parametrize("max_length", [16, 64, 1000])
def test_windows_cover_the_same_characters_on_both_sides(tokenized, max_length):
    student_docs, teacher_docs = tokenized
    windows = pack_windows(student_docs, teacher_docs, max_length)
    assert [w.index for w in windows] == list(range(len(windows)))
    for window in windows:
        assert 2 <= len(window.student_ids) <= max_length and 2 <= len(window.teacher_ids) <= max_length
        num_groups = window.student_group[-1] + 1
        assert window.teacher_group[-1] + 1 == num_groups
        assert np.all(np.diff(window.student_group) >= 0) and np.all(np.diff(window.teacher_group) >= 0)
        student_group_bytes = np.bincount(window.student_group, weights=window.student_bytes)
        teacher_group_bytes = np.bincount(window.teacher_group, weights=window.teacher_bytes)
        assert student_group_bytes.tolist() == teacher_group_bytes.tolist()
    expected = reference_windows(student_docs, teacher_docs, max_length)
    assert [w.student_ids.tolist() for w in windows] == [student for student, _ in expected]
    assert [w.teacher_ids.tolist() for w in windows] == [teacher for _, teacher in expected]
    teacher_stream = np.array(stream(teacher_docs, "ids"))  # every document has tokens: all are kept
    for window in windows:  # teacher_start: where a window's teacher tokens stand in that stream
        start = window.teacher_start
        assert teacher_stream[start : start + len(window.teacher_ids)].tolist() == window.teacher_ids.tolist()
    if max_length >= 64:  # no group is that long: the windows are the whole stream
        assert window_stream(windows, "student_ids") == stream(student_docs, "ids")
        assert window_stream(windows, "teacher_ids") == stream(teacher_docs, "ids")
        assert window_stream(windows, "student_bytes") == stream(student_docs, "nbytes")


def reference_windows(student_docs, teacher_docs, max_length) -> list[tuple[list[int], list[int]]]:
    """Plain greedy packing, one group at a time: (student ids, teacher ids) of each window."""
    groups = []
    for student_doc, teacher_doc in zip(student_docs, teacher_docs, strict=True):
        teacher_group_ends, student_group_ends = alignment_groups(teacher_doc.ends, student_doc.ends)
        student_starts, teacher_starts = [0, *student_group_ends[:-1]], [0, *teacher_group_ends[:-1]]
        for s0, s1, t0, t1 in zip(
            student_starts, student_group_ends, teacher_starts, teacher_group_ends, strict=True
        ):
            groups.append((student_doc.ids[s0:s1].tolist(), teacher_doc.ids[t0:t1].tolist()))
    windows, student, teacher = [], [], []
    for group_student, group_teacher in groups:
        oversized = max(len(group_student), len(group_teacher)) > max_length
        if (
            oversized
            or max(len(student) + len(group_student), len(teacher) + len(group_teacher)) > max_length
        ):
            windows.append((student, teacher))
            student, teacher = [], []
        if not oversized:
            student, teacher = student + group_student, teacher + group_teacher
    windows.append((student, teacher))
    return [(student, teacher) for student, teacher in windows if min(len(student), len(teacher)) >= 2]


def test_packing_is_deterministic(tokenized):
    first, second = pack_windows(*tokenized, 32), pack_windows(*tokenized, 32)
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.index == b.index
        for field in ("student_ids", "student_bytes", "student_group", "teacher_ids", "teacher_bytes"):
            assert np.array_equal(getattr(a, field), getattr(b, field))


def test_one_tokenizer_gives_windows_of_exactly_max_length(tokenized):
    student_docs, _ = tokenized
    windows = pack_windows(student_docs, None, 50)
    assert [len(w.student_ids) for w in windows[:-1]] == [50] * (len(windows) - 1)
    assert window_stream(windows, "student_ids") == stream(student_docs, "ids")[: 50 * len(windows)]
    assert sum(len(doc) for doc in student_docs) - 50 * len(windows) < 2  # only a lone last token is dropped
    assert all(w.teacher_ids is None and w.teacher_group is None for w in windows)
    assert windows[0].student_group.tolist() == list(range(50))


def doc(ids, ends, nbytes) -> TokenizedDoc:
    return TokenizedDoc(np.array(ids), np.array(ends), np.array(nbytes))


def test_a_group_longer_than_max_length_is_dropped_and_a_final_single_token_too():
    # student: "ab" + "cdefg" (one token) + "h"; teacher: "a", "b", "c".."g" one token each, "h"
    student = doc([1, 2, 3, 4], [1, 2, 7, 8], [1, 1, 5, 1])
    teacher = doc([11, 12, 13, 14, 15, 16, 17, 18], [1, 2, 3, 4, 5, 6, 7, 8], [1] * 8)
    windows = pack_windows([student], [teacher], max_length=4)
    # groups: a | b | cdefg (1 student, 5 teacher tokens: too long) | h (a lone final group: dropped)
    assert len(windows) == 1
    assert windows[0].student_ids.tolist() == [1, 2] and windows[0].teacher_ids.tolist() == [11, 12]
    assert windows[0].student_group.tolist() == windows[0].teacher_group.tolist() == [0, 1]


def test_documents_without_tokens_are_skipped():
    student = [doc([1, 2], [1, 2], [1, 1]), doc([], [], []), doc([3, 4], [1, 2], [1, 1])]
    teacher = [doc([5, 6], [1, 2], [1, 1]), doc([7], [1], [1]), doc([8, 9], [1, 2], [1, 1])]
    (window,) = pack_windows(student, teacher, max_length=8)
    assert window.student_ids.tolist() == [1, 2, 3, 4] and window.teacher_ids.tolist() == [5, 6, 8, 9]


def test_collate_pads_shifts_labels_and_points_at_group_ends(
    tokenized, metaspace_tokenizer, byte_level_tokenizer
):
    windows = pack_windows(*tokenized, 24)[:5]
    student_pad, teacher_pad = metaspace_tokenizer.pad_token_id, byte_level_tokenizer.pad_token_id
    batch = collate_windows(windows, student_pad, teacher_pad)
    batch_size = len(windows)
    student_length = max(len(w.student_ids) for w in windows)
    teacher_length = max(len(w.teacher_ids) for w in windows)
    num_groups = max(w.student_group[-1] + 1 for w in windows)
    assert batch.student.input_ids.shape == batch.student.labels.shape == (batch_size, student_length)
    assert batch.teacher.input_ids.shape == batch.teacher.group.shape == (batch_size, teacher_length)
    assert batch.alignment.student_pos.shape == batch.alignment.mask.shape == (batch_size, num_groups)
    assert batch.window_index.tolist() == [w.index for w in windows]
    assert batch.alignment.mask.dtype == torch.bool
    assert all(value.dtype == torch.long for key, value in batch.named_tensors() if key != "alignment.mask")

    for b, window in enumerate(windows):
        for side in ("student", "teacher"):
            ids, nbytes, group = (getattr(window, f"{side}_{field}") for field in ("ids", "bytes", "group"))
            n = len(ids)
            tokens = batch.side(side)
            assert tokens.input_ids[b, :n].tolist() == ids.tolist()
            assert tokens.attention_mask[b].tolist() == [1] * n + [0] * (tokens.labels.shape[1] - n)
            assert tokens.labels[b, : n - 1].tolist() == ids[1:].tolist()
            assert (tokens.labels[b, n - 1 :] == -100).all()
            assert tokens.target_bytes[b, : n - 1].tolist() == nbytes[1:].tolist()
            assert (tokens.target_bytes[b, n - 1 :] == 0).all()
            assert tokens.group[b, :n].tolist() == group.tolist()
            assert (tokens.group[b, n:] == -1).all()
        pad_positions = batch.student.attention_mask[b] == 0
        assert (batch.student.input_ids[b][pad_positions] == student_pad).all()

        groups = window.student_group[-1] + 1
        assert batch.alignment.mask[b].tolist() == [True] * (groups - 1) + [False] * (num_groups - groups + 1)
        assert (batch.alignment.student_pos[b, groups:] == 0).all()
        student_cum_bytes = np.cumsum(window.student_bytes)
        teacher_cum_bytes = np.cumsum(window.teacher_bytes)
        for g in range(groups - 1):
            s, t = int(batch.alignment.student_pos[b, g]), int(batch.alignment.teacher_pos[b, g])
            assert window.student_group[s] == g and window.student_group[s + 1] == g + 1
            assert window.teacher_group[t] == g and window.teacher_group[t + 1] == g + 1
            # both next tokens start at the same character
            assert student_cum_bytes[s] == teacher_cum_bytes[t]
            assert batch.student.labels[b, s] == window.student_ids[s + 1]
            assert batch.teacher.labels[b, t] == window.teacher_ids[t + 1]


def test_collate_without_teacher_has_no_teacher_keys(tokenized):
    windows = pack_windows(tokenized[0], None, 16)[:3]
    batch = collate_windows(windows, 0, None)
    assert batch.teacher is None and batch.alignment is None
    assert batch.student.input_ids.shape == (3, 16)
    assert batch.student.labels.dtype == batch.student.group.dtype == batch.window_index.dtype
