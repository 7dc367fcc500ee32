import pytest
import torch
from batches import batch_of

from sakd.data.batch import Alignment, CachedTargets, LossRows


def _full_batch():
    ids = torch.arange(12).reshape(2, 6)
    mask = torch.tensor([[True, False], [True, True]])
    positions = torch.zeros(2, 2, dtype=torch.long)
    rows = LossRows(torch.arange(5), torch.arange(3), torch.arange(3))
    cache = CachedTargets(torch.zeros(2, 2, 4, dtype=torch.long), torch.rand(2, 2, 4), torch.rand(2, 2))
    return batch_of(ids, ids + 100, alignment=Alignment(mask, positions, positions), rows=rows, cache=cache)


def test_named_tensors_name_every_tensor_of_every_part():
    names = [name for name, _ in _full_batch().named_tensors()]
    sides = [f"{s}.{f}" for s in ("student", "teacher") for f in ("input_ids", "attention_mask", "labels")]
    assert set(sides) <= set(names)
    assert {"window_index", "alignment.mask", "rows.group", "cache.probs", "cache.tail"} <= set(names)
    assert len(names) == 2 * 5 + 1 + 3 + 3 + 3


def test_to_moves_every_tensor_into_a_new_batch():
    batch = _full_batch()
    moved = batch.to("meta")
    assert all(t.device.type == "meta" for _, t in moved.named_tensors())
    assert all(t.device.type == "cpu" for _, t in batch.named_tensors())  # the original is unchanged
    before, after = dict(batch.named_tensors()), dict(moved.named_tensors())
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape and before[k].dtype == after[k].dtype for k in before)


def test_absent_parts_stay_absent_and_a_missing_side_is_refused():
    batch = batch_of(torch.zeros(1, 3, dtype=torch.long))
    moved = batch.to("meta")
    assert moved.teacher is moved.alignment is moved.rows is moved.cache is None
    assert moved.side("student") is moved.student
    with pytest.raises(ValueError, match="no teacher side"):
        batch.side("teacher")
