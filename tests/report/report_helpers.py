"""Shared by the report tests: a fast run config, PNG checks, report sections."""

from __future__ import annotations

import copy
import re
from pathlib import Path

from matplotlib.image import imread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUXILIARY_LOSSES = (
    "feature",
    "attention",
    "router",
    "balance",
    "layerwise",
    "contrastive",
    "token_weighting",
)


def small_run_config(base_config: dict, assets: dict, **train_overrides) -> dict:
    """base_config on a small corpus (a few dozen windows of 48 tokens), so that a run takes seconds."""
    raw = copy.deepcopy(base_config)
    raw["data"].update(
        train=[str(assets["eval"])], eval=[str(assets["eval"])], max_length=48, eval_max_windows=4
    )
    raw["train"].update(train_overrides)
    # KD + LM only: the report does not depend on which losses run, and the others are slower on CPU.
    raw["curriculum"] = {"weights": dict.fromkeys(AUXILIARY_LOSSES, 0.0)}
    return raw


def assert_plot_has_data(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.std() > 0.05
    # Axes, ticks and text are black or grey; data is drawn in colours.
    coloured = (pixels.max(-1) - pixels.min(-1) > 0.3).sum()
    assert coloured > 100, f"{path.name}: (almost) no data drawn"


def report_sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))
