"""Read a run folder: config.yaml, environment.json, metrics.jsonl, summary.json, final/sakd.json, eval.json.

metrics.jsonl holds one record per line: {"event": "train" | "eval" | "skip" | "resume" | "end", "step": ...}.
A run resumed from a checkpoint older than its last logged step logs those steps again; the later record
of a step is the one that counts (`latest_by_step`). A line cut short by a killed process is skipped and
counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sakd.errors import UserError

EVAL_FILE = (
    "eval.json"  # `sakd eval --output RUN_DIR/eval.json` adds a teacher-student comparison to the report
)


@dataclass
class Segment:
    """The records of one process lifetime of the run: from its start or a resume to the next resume."""

    index: int
    resume: dict[str, Any] | None
    records: list[dict[str, Any]] = field(default_factory=list)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == event]

    @property
    def first_step(self) -> int:
        return int(self.resume["step"]) if self.resume else 0

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.records if isinstance(r.get("step"), int)]
        return max(steps) if steps else None


@dataclass
class RunFolder:
    path: Path
    records: list[dict[str, Any]]
    bad_lines: int
    config: dict[str, Any] | None
    config_text: str | None
    environment: dict[str, Any] | None
    summary: dict[str, Any] | None
    final_info: dict[str, Any] | None
    eval_result: dict[str, Any] | None

    def of(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == event]

    def segments(self) -> list[Segment]:
        segments = [Segment(0, None)]
        for record in self.records:
            if record.get("event") == "resume":
                segments.append(Segment(len(segments), record))
            else:
                segments[-1].records.append(record)
        return segments

    def config_value(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config or {}
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node


def latest_by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last one logged, in step order."""
    by_step = {r["step"]: r for r in records if isinstance(r.get("step"), int)}
    return [by_step[s] for s in sorted(by_step)]


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, number of unreadable lines) of a metrics.jsonl file; no file gives no records."""
    records, bad = [], 0
    if not path.exists():
        return records, bad
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    return records, bad


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def load_run(run_dir: str | Path) -> RunFolder:
    path = Path(run_dir)
    if not (path / "metrics.jsonl").exists() and not (path / "config.yaml").exists():
        raise UserError(
            f"'{run_dir}' is not a run folder (no metrics.jsonl or config.yaml): give the output_dir of a "
            "`sakd train` run"
        )
    records, bad = read_metrics(path / "metrics.jsonl")
    config_text = (path / "config.yaml").read_text() if (path / "config.yaml").exists() else None
    try:
        config = yaml.safe_load(config_text) if config_text else None
    except yaml.YAMLError:
        config = None
    return RunFolder(
        path=path,
        records=records,
        bad_lines=bad,
        config=config if isinstance(config, dict) else None,
        config_text=config_text,
        environment=_json(path / "environment.json"),
        summary=_json(path / "summary.json"),
        final_info=_json(path / "final" / "sakd.json"),
        eval_result=_json(path / EVAL_FILE),
    )
