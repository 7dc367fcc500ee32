"""The skew divergences train end to end across tokenizers, with their own alpha."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from helpers import metrics_records

from sakd.config import validate
from sakd.train.loop import train


def test_divergence_parameter_is_the_chosen_divergences_own(base_config):
    raw = copy.deepcopy(base_config)
    raw["distill"] = {"divergence": "skew_kl", "skew_alpha": 0.2, "jsd_beta": 0.7}
    assert validate(raw).distill.divergence_parameter == 0.2
    raw["distill"]["divergence"] = "jsd"
    assert validate(raw).distill.divergence_parameter == 0.7


@pytest.mark.parametrize("name", ["skew_kl", "skew_rkl"])
def test_skew_divergence_trains_across_tokenizers(base_config, name, tmp_path):
    raw = copy.deepcopy(base_config)
    raw["distill"] = {"divergence": name, "skew_alpha": 0.1}
    raw["train"].update(max_steps=2)
    raw["output_dir"] = str(tmp_path / "run")
    summary = train(validate(raw))
    assert summary["step"] == 2
    kd = [r["loss_kd"] for r in metrics_records(Path(raw["output_dir"]), "train")]
    assert len(kd) == 2 and all(math.isfinite(v) and v > 0 for v in kd)
