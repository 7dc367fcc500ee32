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
        aligned = window.student_group >= 0
        num_groups = window.student_group[aligned][-1] + 1
        assert window.teacher_group[-1] + 1 == num_groups and np.all(window.teacher_group >= 0)
        assert np.all(np.diff(window.student_group[aligned]) >= 0)
        assert np.all(np.diff(window.teacher_group) >= 0)
        assert np.all(np.diff(np.flatnonzero(aligned)) == 1)  # the aligned tokens are one run
        student_group_bytes = np.bincount(
            window.student_group[aligned], weights=window.student_bytes[aligned]
        )
        teacher_group_bytes = np.bincount(window.teacher_group, weights=window.teacher_bytes)
        assert student_group_bytes.tolist() == teacher_group_bytes.tolist()
    expected = reference_windows(student_docs, teacher_docs, max_length)
    assert [w.student_ids.tolist() for w in windows] == [student for student, _, _ in expected]
    assert [w.student_group.tolist() for w in windows] == [group for _, group, _ in expected]
    assert [w.teacher_ids.tolist() for w in windows] == [teacher for _, _, teacher in expected]
    teacher_stream = np.array(stream(teacher_docs, "ids"))  # every document has tokens: all are kept
    for window in windows:  # teacher_start: where a window's teacher tokens stand in that stream
        start = window.teacher_start
        assert teacher_stream[start : start + len(window.teacher_ids)].tolist() == window.teacher_ids.tolist()
    if max_length >= 64:  # the student's windows are exactly those it gets alone: same tokens, same order
        alone = pack_windows(student_docs, None, max_length)
        assert [w.student_ids.tolist() for w in windows] == [w.student_ids.tolist() for w in alone]
    if max_length >= 1000:  # no window edge cuts a group but the stream's: the windows are the whole stream
        assert window_stream(windows, "teacher_ids") == stream(teacher_docs, "ids")


def reference_windows(student_docs, teacher_docs, max_length) -> list[tuple[list[int], list[int], list[int]]]:
    """Plain loops: the student stream cut every `max_length` tokens; in each window, the whole groups from
    its first one while the teacher side fits. (student ids, student group of each token, teacher ids)."""
    groups, offset, teacher_offset = [], 0, 0  # (student start, stop, teacher start, stop) in the streams
    for student_doc, teacher_doc in zip(student_docs, teacher_docs, strict=True):
        teacher_group_ends, student_group_ends = alignment_groups(teacher_doc.ends, student_doc.ends)
        student_starts, teacher_starts = [0, *student_group_ends[:-1]], [0, *teacher_group_ends[:-1]]
        for s0, s1, t0, t1 in zip(
            student_starts, student_group_ends, teacher_starts, teacher_group_ends, strict=True
        ):
            groups.append((offset + s0, offset + s1, teacher_offset + t0, teacher_offset + t1))
        offset, teacher_offset = offset + len(student_doc), teacher_offset + len(teacher_doc)
    student_ids, teacher_ids = stream(student_docs, "ids"), stream(teacher_docs, "ids")
    windows = []
    for start in range(0, len(student_ids), max_length):
        stop = min(start + max_length, len(student_ids))
        group, teacher, count = [-1] * (stop - start), [], 0
        for s0, s1, t0, t1 in groups:
            if s0 < start or s1 > stop:
                continue
            if t1 - t0 > max_length and not teacher:
                continue  # a leading group too long for the teacher's side stays unaligned
            if len(teacher) + t1 - t0 > max_length:
                break
            for position in range(s0, s1):
                group[position - start] = count
            teacher, count = teacher + teacher_ids[t0:t1], count + 1
        if stop - start >= 2 and len(teacher) >= 2:
            windows.append((student_ids[start:stop], group, teacher))
    return windows


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


def test_a_group_too_long_for_the_teacher_side_learns_from_the_lm_loss_alone():
    # student: "a", "b", "cdefg" (one token), "h"; teacher: one token per character
    student = doc([1, 2, 3, 4], [1, 2, 7, 8], [1, 1, 5, 1])
    teacher = doc([11, 12, 13, 14, 15, 16, 17, 18], [1, 2, 3, 4, 5, 6, 7, 8], [1] * 8)
    (window,) = pack_windows([student], [teacher], max_length=4)
    # groups a | b | cdefg (5 teacher tokens: past the teacher's 4) | h: the teacher side stops before cdefg
    assert window.student_ids.tolist() == [1, 2, 3, 4] and window.teacher_ids.tolist() == [11, 12]
    assert window.student_group.tolist() == [0, 1, -1, -1] and window.teacher_group.tolist() == [0, 1]
    # a window that starts with such a group aligns from the group after it
    student = doc([3, 4, 5], [5, 6, 7], [5, 1, 1])
    teacher = doc([13, 14, 15, 16, 17, 18, 19], [1, 2, 3, 4, 5, 6, 7], [1] * 7)
    (window,) = pack_windows([student], [teacher], max_length=4)
    assert window.student_group.tolist() == [-1, 0, 1] and window.teacher_ids.tolist() == [18, 19]
    assert window.teacher_start == 5
    # the student stream's last lone token is dropped, as without a teacher
    student = doc([1, 2, 3, 4], [1, 2, 7, 8], [1, 1, 5, 1])
    teacher = doc([11, 12, 13, 14, 15, 16, 17, 18], [1, 2, 3, 4, 5, 6, 7, 8], [1] * 8)
    assert [w.student_ids.tolist() for w in pack_windows([student], [teacher], max_length=3)] == [[1, 2, 3]]


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
    num_groups = max(w.student_group.max() + 1 for w in windows)
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

        groups = window.student_group.max() + 1
        assert batch.alignment.mask[b].tolist() == [True] * (groups - 1) + [False] * (num_groups - groups + 1)
        assert (batch.alignment.student_pos[b, groups:] == 0).all()
        leading = window.student_bytes[: np.argmax(window.student_group >= 0)].sum()  # before its first group
        student_cum_bytes = np.cumsum(window.student_bytes) - leading
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
