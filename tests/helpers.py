"""What tests across the package share: a config written as YAML, the metrics records of a run folder, and the
real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def write_yaml(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def metrics_records(run: Path, event: str | None = None) -> list[dict]:
    """The records of a run folder's metrics.jsonl in order, only those of `event` if given."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if event is None or r.get("event") == event]


class CLIRun:
    """`python -m sakd ARGS` in a subprocess, its output in files (a pipe could fill up and block it)."""

    def __init__(self, *args: str, logs: Path):
        self.command = args[0]
        self.stdout_path = logs.with_suffix(".out")
        self.stderr_path = logs.with_suffix(".err")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sakd", *args], stdout=out, stderr=err, env=env
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def wait_for(self, path: Path, timeout: float = 600) -> None:
        """Until `path` exists; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"sakd {self.command} ended (status {self.proc.returncode}) before {path} existed:\n"
                    f"{self.stderr}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"{path} did not appear within {timeout} s")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        """The exit status, stdout and stderr once the process ends (killed if it outlives `timeout`)."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return code, self.stdout, self.stderr
