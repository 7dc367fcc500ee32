"""`sakd` with faults on one process, run by torchrun in place of `-m sakd`: SAKD_FAULT="RANK NAN_CALL
RAISE_CALL" poisons the teacher's hidden state with NaN at teacher forward NAN_CALL (1-based) and raises at
RAISE_CALL, on process RANK only (0 for a call: never)."""

from __future__ import annotations

import os
import sys

from sakd.cli import main
from sakd.train import teacher


def _install(rank: int, nan_call: int, raise_call: int) -> None:
    real = teacher.LiveTeacher.teacher_pass
    count = {"n": 0}

    def faulty(teacher, batch, *args):
        result = real(teacher, batch, *args)
        count["n"] += 1
        if int(os.environ.get("RANK", 0)) == rank:
            if count["n"] == raise_call:
                raise RuntimeError(f"injected failure on rank {rank} at teacher call {count['n']}")
            if count["n"] == nan_call:
                result.hidden[0] = float("nan")
        return result

    teacher.LiveTeacher.teacher_pass = staticmethod(faulty)


if __name__ == "__main__":
    _install(*(int(x) for x in os.environ["SAKD_FAULT"].split()))
    raise SystemExit(main(sys.argv[1:]))
