"""Run by torchrun on two CPU processes: host values are reduced on the default group where it is gloo, and on
a gloo group of their own where it is not (the case of NCCL, stood in for by reporting another backend)."""

from __future__ import annotations

import torch.distributed as dist
from accelerate import Accelerator

from sakd.train import collective
from sakd.train.rows import TokenCounts


def check(accelerator: Accelerator) -> None:
    rank = accelerator.process_index
    counts, tokens = collective.global_counts(TokenCounts(10 + rank, 3 * rank), 100 * (rank + 1), accelerator)
    assert (counts.lm, counts.kd, tokens) == (21, 3, 300), (counts, tokens)
    assert collective.agree_max(7 * rank, accelerator) == 7
    sums = collective.global_sums({"a": 0.25 + rank, "b": -1.0}, accelerator)
    assert sums == {"a": 1.5, "b": -2.0}, sums


def main() -> None:
    accelerator = Accelerator(cpu=True)
    assert collective.host_group() is None  # the default group is gloo
    check(accelerator)
    gloo = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        side = collective.host_group()
        assert side is not None and collective.host_group() is side  # made once
        assert dist.get_world_size(side) == 2
        check(accelerator)
        collective.release_host_groups()
        assert collective.host_group() is not side  # a later run makes its own
        collective.release_host_groups()
    finally:
        dist.get_backend = gloo
    print(f"rank {accelerator.process_index}: host collectives ok", flush=True)


if __name__ == "__main__":
    main()
