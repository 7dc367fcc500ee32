import numpy as np
import pytest

from sakd.data.loader import Shard, WindowLoader
from sakd.data.packing import Window
from sakd.errors import UserError


def make_windows(count: int, with_teacher: bool = True) -> list[Window]:
    windows = []
    for index in range(count):
        length = 3 + index % 4
        ids = np.arange(index * 10, index * 10 + length, dtype=np.int64)
        group = np.arange(length, dtype=np.int64)
        ones = np.ones(length, dtype=np.int64)
        teacher = (ids + 1000, ones, group) if with_teacher else (None, None, None)
        windows.append(Window(ids, ones, group, *teacher, index=index))
    return windows


def indices(batch) -> list[int]:
    return batch.window_index.tolist()


def test_epoch_order_is_a_seeded_permutation_and_batches_per_epoch():
    loader = WindowLoader(make_windows(23), batch_size=4, seed=7, teacher=0)
    assert loader.batches_per_epoch == len(loader) == 5
    first_epoch = [i for _ in range(5) for i in indices(loader.next_batch())]
    assert len(set(first_epoch)) == 20
    assert first_epoch == np.random.default_rng([7, 0]).permutation(23)[:20].tolist()
    assert loader.state_dict() == {"epoch": 1, "batch_in_epoch": 0, "seed": 7, "num_windows": 23}
    second_epoch = [i for _ in range(5) for i in indices(loader.next_batch())]
    assert second_epoch != first_epoch


def test_same_seed_same_batches_other_seed_other_order():
    windows = make_windows(40)
    first, second = (WindowLoader(windows, 4, seed=3, teacher=0) for _ in range(2))
    other = WindowLoader(windows, 4, seed=4, teacher=0)
    first_batches = [first.next_batch() for _ in range(12)]
    second_batches = [second.next_batch() for _ in range(12)]
    for a, b in zip(first_batches, second_batches, strict=True):
        a, b = dict(a.named_tensors()), dict(b.named_tensors())
        assert a.keys() == b.keys()
        assert all(a[key].equal(b[key]) for key in a)
    assert [indices(b) for b in first_batches] != [indices(other.next_batch()) for _ in range(12)]


def test_ranks_are_disjoint_and_together_make_the_single_process_batches():
    windows = make_windows(50)
    single = WindowLoader(windows, batch_size=6, seed=1, teacher=0)
    ranks = [WindowLoader(windows, 3, seed=1, shard=Shard(r, 2), teacher=0) for r in range(2)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch == 8
    for _ in range(20):  # across epochs
        rank_indices = [indices(loader.next_batch()) for loader in ranks]
        assert not set(rank_indices[0]) & set(rank_indices[1])
        assert rank_indices[0] + rank_indices[1] == indices(single.next_batch())


def test_resumed_loader_continues_with_the_same_batches_across_an_epoch_boundary():
    windows = make_windows(30)
    uninterrupted = WindowLoader(windows, 4, seed=5, teacher=0)
    expected = [uninterrupted.next_batch() for _ in range(17)]  # 7 batches per epoch
    interrupted = WindowLoader(windows, 4, seed=5, teacher=0)
    for _ in range(6):
        interrupted.next_batch()
    state = interrupted.state_dict()
    resumed = WindowLoader(windows, 4, seed=99, teacher=0)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for batch in expected[6:]:
        got = dict(resumed.next_batch().named_tensors())
        assert all(got[key].equal(value) for key, value in batch.named_tensors())


def test_a_state_for_other_data_is_refused():
    loader = WindowLoader(make_windows(30), 4, seed=5)
    with pytest.raises(ValueError, match="30"):
        loader.load_state_dict({"epoch": 0, "batch_in_epoch": 1, "seed": 5, "num_windows": 31})


def test_eval_order_keeps_the_tail_split_between_ranks():
    windows = make_windows(11, with_teacher=False)
    single = WindowLoader(windows, 4, seed=0, shuffle=False, drop_last=False)
    assert [indices(batch) for batch in single] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [indices(batch) for batch in single] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # again
    ranks = [
        WindowLoader(windows, 2, seed=0, shuffle=False, shard=Shard(r, 2), drop_last=False) for r in (0, 1)
    ]
    assert [indices(batch) for batch in ranks[0]] == [[0, 1], [4, 5], [8, 9]]
    assert [indices(batch) for batch in ranks[1]] == [[2, 3], [6, 7], [10]]
    batch = WindowLoader(windows, 4, seed=0, shuffle=False, drop_last=False).next_batch()
    assert batch.teacher is None and batch.student.input_ids.shape == (4, 6)


def test_iteration_runs_the_rest_of_the_current_epoch():
    loader = WindowLoader(make_windows(20), 4, seed=2, teacher=0)
    loader.next_batch()
    assert len(list(loader)) == 4
    assert loader.state_dict()["epoch"] == 1


def test_too_few_windows_for_a_batch_is_a_user_error():
    with pytest.raises(UserError, match="3 windows, fewer than one batch of 2 x 2"):
        WindowLoader(make_windows(3), 2, seed=0, shard=Shard(0, 2))
