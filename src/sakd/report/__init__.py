"""Reporting: metrics.jsonl / TensorBoard / W&B writing during training, plots and the run report.

Names are imported on first use, so that the training loop's `MetricsWriter` does not load matplotlib.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MetricsWriter": "sakd.report.trackers",
    "RunFolder": "sakd.report.run_folder",
    "load_run": "sakd.report.run_folder",
    "write_plots": "sakd.report.plots",
    "build_report": "sakd.report.build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sakd.report' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
