"""Rows per chunk: a chunk's logits stay within `distill.chunk_logits` whatever the vocabulary."""

from __future__ import annotations

from torch import nn

from sakd.losses import Chunking, chunk_rows


def test_chunk_rows_bounds_the_logits_of_a_chunk():
    assert chunk_rows(1024, 2**26, 4096) == 1024  # small vocabulary: chunk_size decides
    assert chunk_rows(1024, 2**26, 151_936) == 441  # 441 x 151,936 <= 2**26 < 442 x 151,936
    assert 441 * 151_936 <= 2**26 < 442 * 151_936
    assert chunk_rows(1024, 10, 151_936) == 1  # never zero rows
    assert chunk_rows(1024, None, 151_936) == 1024


def test_the_widest_head_sets_the_rows():
    chunking = Chunking(1024, 2**20)
    student, teacher = nn.Linear(8, 2048, bias=False), nn.Linear(8, 8192, bias=False)
    assert chunking.rows(student) == 512
    assert chunking.rows(student, teacher) == 128
    assert chunking.rows(student, None) == 512


def test_the_default_bound_depends_on_the_device():
    """Small chunks on a CPU (their tensors are kept between chunks), few large ones on a GPU (launches);
    a configured bound is used on every device."""
    from sakd.config import DistillConfig

    default = DistillConfig()
    assert default.chunk_logits_on("cpu") == 2**21 and chunk_rows(1024, 2**21, 151_936) == 13
    assert default.chunk_logits_on("cuda") == 2**26
    assert DistillConfig(chunk_logits=1000).chunk_logits_on("cuda") == 1000
    assert DistillConfig(chunk_logits=1000).chunk_logits_on("cpu") == 1000


def test_a_wide_head_keeps_enough_rows_per_chunk():
    """Few rows per chunk make the head's products slow per row; the floor follows the widest head."""
    assert chunk_rows(1024, 2**21, 262_144) == 8  # no hidden size given: no floor
    assert chunk_rows(1024, 2**21, 262_144, hidden=640) == 80
    assert chunk_rows(1024, 2**21, 151_936, hidden=128) == 16
    assert chunk_rows(1024, 2**21, 151_936, hidden=64) == 13  # a narrow head: the logits bound decides
    assert chunk_rows(32, 2**21, 262_144, hidden=640) == 32  # never above chunk_size
    chunking = Chunking(1024, 2**21)
    student = nn.Linear(576, 49_152, bias=False, device="meta")
    teacher = nn.Linear(640, 262_144, bias=False, device="meta")
    assert chunking.rows(student, teacher) == 80
