"""`sakd ablate`: the aggregation over seeds on known numbers, and the runner with stand-in variant runs (a real
ablation pretrains the demo teacher and trains every variant for minutes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sakd.cli import main
from sakd.tools import ablate
from sakd.tools.ablate import BASELINE, REFERENCE, aggregate_seeds, run_ablation, seeds_table
from sakd.tools.demo import QUICK, DemoSetup

PLAIN = [2.0, 2.1, 2.3]
SHIFTS = {
    REFERENCE: [0.0, 0.0, 0.0],
    "steady gain": [-0.1, -0.2, -0.3],  # mean -0.2, std 0.1, std error 0.1 / sqrt(3)
    "noisy gain": [-0.3, 0.1, -0.1],  # mean -0.1, std 0.2, std error 0.2 / sqrt(3): within noise
    "loss": [0.1, 0.2, 0.3],
}


def _rows(shifts: dict[str, list[float]]) -> list[dict]:
    return [
        {"variant": name, "seed": seed, "bits_per_byte": PLAIN[seed] + d[seed], "tokens_per_s": 100 + seed}
        for name, d in shifts.items()
        for seed in range(3)
    ]


def test_aggregate_seeds_on_known_numbers():
    result = aggregate_seeds(_rows(SHIFTS))
    assert result["seeds"] == [0, 1, 2] and result["reference"] == REFERENCE
    by_name = {v["variant"]: v for v in result["variants"]}
    plain = by_name[REFERENCE]
    assert plain["bits_per_byte"] == PLAIN
    assert plain["mean"] == pytest.approx(6.4 / 3)
    assert plain["std"] == pytest.approx(math.sqrt(0.07 / 3))  # sample standard deviation
    assert plain["tokens_per_s"] == 101
    assert plain["vs_reference"] == {"per_seed": [0.0, 0.0, 0.0], "mean": 0.0, "std": 0.0, "stderr": 0.0}
    assert not plain["significant_gain"]

    steady = by_name["steady gain"]
    assert steady["vs_reference"]["per_seed"] == pytest.approx([-0.1, -0.2, -0.3])
    assert steady["vs_reference"]["mean"] == pytest.approx(-0.2)
    assert steady["vs_reference"]["std"] == pytest.approx(0.1)
    assert steady["vs_reference"]["stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert steady["mean"] == pytest.approx(6.4 / 3 - 0.2)
    assert steady["significant_gain"]  # 0.2 > 2 * 0.0577

    noisy = by_name["noisy gain"]
    assert noisy["vs_reference"]["mean"] == pytest.approx(-0.1)
    assert noisy["vs_reference"]["stderr"] == pytest.approx(0.2 / math.sqrt(3))
    assert not noisy["significant_gain"]  # 0.1 < 2 * 0.1155
    assert not by_name["loss"]["significant_gain"]

    table = seeds_table(result)
    assert "mean +- std (3 seeds)" in table[0]
    assert "| steady gain | 1.9333 +- 0.0577 | -0.2000 +- 0.0577 | yes | 101 |" in table
    assert "| noisy gain |" in table[4] and "| no |" in table[4]


def test_aggregate_seeds_refuses_unpaired_runs():
    rows = _rows(SHIFTS)
    with pytest.raises(ValueError, match="reference"):
        aggregate_seeds([r for r in rows if r["variant"] != REFERENCE])
    with pytest.raises(ValueError, match="seeds"):
        aggregate_seeds([r for r in rows if not (r["variant"] == "loss" and r["seed"] == 2)])


class FakeSetup:
    """Stands in for the demo setup: each run returns bits per byte from SHIFTS and writes a metrics log."""

    def __init__(self, work: Path):
        self.work = work
        self.calls: list[tuple[str, int, bool]] = []

    def student_run(
        self, slug: str, teacher: bool = True, seed: int = 0, curriculum=None, distill=None
    ) -> dict:
        self.calls.append((slug, seed, teacher))
        self.distill = getattr(self, "distill", {}) | {slug: distill}
        self.curricula = getattr(self, "curricula", {}) | {slug: curriculum}
        variants = ablate.VARIANTS.items()
        name = BASELINE if not teacher else next((n for n, v in variants if v == curriculum), REFERENCE)
        shift = {BASELINE: [0.05] * 3, "KD + token weights": SHIFTS["steady gain"]}.get(name, [0.0] * 3)
        (self.work / slug).mkdir(parents=True)
        (self.work / slug / "metrics.jsonl").write_text(json.dumps({"event": "train", "tokens_per_s": 50.0}))
        return {"final": {"bits_per_byte": PLAIN[seed] + shift[seed], "weights": "ema"}}


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeSetup:
    setup = FakeSetup(tmp_path)
    monkeypatch.setattr(ablate, "prepare", lambda workdir, quick: setup)
    return setup


def test_several_seeds_run_every_variant_on_each(fake, tmp_path, capsys):
    result = run_ablation(tmp_path, quick=True, variants=["KD + token weights"], seeds=3)
    # plain KD joins as the reference; seed 0 keeps the single-seed folders
    assert [c[0] for c in fake.calls[:3]] == [
        "ablate-lm-only--baseline",
        "ablate-plain-kd",
        "ablate-kd---token-weights",
    ]
    assert fake.calls[3] == ("ablate-lm-only--baseline-seed1", 1, False)
    assert sorted({c[1] for c in fake.calls}) == [0, 1, 2] and len(fake.calls) == 9
    written = json.loads((tmp_path / "ablation.json").read_text())
    assert written == result
    by_name = {v["variant"]: v for v in written["variants"]}
    assert by_name["KD + token weights"]["bits_per_byte"] == pytest.approx([1.9, 1.9, 2.0])
    assert by_name["KD + token weights"]["vs_reference"]["mean"] == pytest.approx(-0.2)
    assert by_name["KD + token weights"]["significant_gain"]
    assert by_name[BASELINE]["vs_reference"]["per_seed"] == pytest.approx([0.05] * 3)
    assert not by_name[BASELINE]["significant_gain"]
    out = capsys.readouterr().out
    assert "| KD + token weights | 1.9333 +- 0.0577 | -0.2000 +- 0.0577 | yes | 50 |" in out
    assert (tmp_path / "ablation.md").read_text().splitlines() == seeds_table(result)


def test_one_seed_keeps_the_single_run_table(fake, tmp_path, capsys):
    rows = run_ablation(tmp_path, quick=True, variants=["KD + token weights"])
    assert [c[0] for c in fake.calls] == ["ablate-lm-only--baseline", "ablate-kd---token-weights"]
    assert rows == [
        {"variant": BASELINE, "bits_per_byte": 2.05, "weights": "ema", "tokens_per_s": 50},
        {"variant": "KD + token weights", "bits_per_byte": 1.9, "weights": "ema", "tokens_per_s": 50},
    ]
    assert json.loads((tmp_path / "ablation.json").read_text()) == rows
    assert capsys.readouterr().out.splitlines()[-4:] == [
        "| variant | held-out bits per byte | tokens/s |",
        "|---|---|---|",
        f"| {BASELINE} | 2.0500 (ema) | 50 |",
        "| KD + token weights | 1.9000 (ema) | 50 |",
    ]


def test_the_seed_reaches_the_student_config(tmp_path):
    setup = DemoSetup(tmp_path, QUICK, tmp_path / "eval.jsonl", tmp_path / "t", tmp_path / "s", {})
    assert setup.student_config()["train"]["seed"] == 0
    assert setup.student_config(seed=2, curriculum={})["train"]["seed"] == 2


def test_seeds_below_one_are_refused(capsys):
    assert main(["ablate", "--seeds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --seeds must be at least 1, got 0"


def test_objective_variants_keep_plain_kds_losses_and_change_the_divergence(fake, tmp_path):
    name = next(n for n in ablate.OBJECTIVES if "TAID" in n)
    assert name in ablate.variant_names()
    run_ablation(tmp_path, quick=True, variants=[name])
    slug = fake.calls[1][0]
    assert fake.distill[slug] == ablate.OBJECTIVES[name] and fake.distill[slug]["divergence"] == "taid"
    assert fake.distill[slug]["chunk_likelihood_weight"] == 0  # compared with plain KD, not the default


def test_only_the_default_variant_runs_the_term_and_consistent_rows(fake, tmp_path):
    """The term and the consistent rows are on by default across tokenizers: plain KD and the other variants
    must turn them off."""
    default = ablate.DEFAULT_OBJECTIVE
    assert default.endswith("(the default)") and default in ablate.variant_names()
    run_ablation(tmp_path, quick=True, variants=["plain KD", default])
    plain, term = (fake.distill[slug] for slug, _, teacher in fake.calls if teacher)
    assert plain["chunk_likelihood_weight"] == 0 and term["chunk_likelihood_weight"] > 0
    assert plain["projection_rows"] == "all" and term["projection_rows"] == "consistent"


def test_the_default_variant_runs_the_default_kd_schedule(fake, tmp_path):
    """Plain KD keeps weight 1; the default objective runs the default KD weight and fade, whatever they are,
    and the other schedules of the term run theirs."""
    from sakd.curriculum import CurriculumSpec

    schedules = [n for n in ablate.OBJECTIVES if n.startswith("KD + chunk likelihood")]
    assert len(schedules) == 3 and ablate.DEFAULT_OBJECTIVE in schedules
    run_ablation(tmp_path, quick=True, variants=["plain KD", *schedules])
    curricula = [fake.curricula[slug] for slug, _, teacher in fake.calls if teacher]
    assert curricula[0]["weights"]["kd"] == 1.0 and not curricula[0]["enabled"]
    spec = CurriculumSpec()
    default = CurriculumSpec(**curricula[1])
    assert (default.weights.kd, default.kd_end) == (spec.weights.kd, spec.kd_end)
    others = {(c["weights"]["kd"], c["kd_end"]) for c in curricula[2:]}
    assert len(others) == 2 and (spec.weights.kd, spec.kd_end) not in others
    assert others <= {(1.0, 0.0), (0.5, 1.0), (1.0, 1.0)}


def test_the_variants_on_top_of_the_default_run_the_default_plus_their_part(fake, tmp_path):
    """On-policy text and the token weights are measured on top of the default: its term, rows and KD
    schedule, plus the on-policy share or the token weights, and nothing else."""
    from sakd.curriculum import CurriculumSpec

    names = [*ablate.ON_POLICY, ablate.TOKEN_WEIGHTS_ON_DEFAULT]
    run_ablation(tmp_path, quick=True, variants=[ablate.DEFAULT_OBJECTIVE, *names])
    runs = [(fake.distill[slug], fake.curricula[slug]) for slug, _, teacher in fake.calls if teacher]
    base_distill, base_curriculum = runs[0]
    shares = []
    for distill, curriculum in runs[1:]:
        extra = {k: v for k, v in distill.items() if base_distill.get(k) != v}
        changed = {k for k, v in curriculum["weights"].items() if base_curriculum["weights"][k] != v}
        assert curriculum["kd_end"] == CurriculumSpec().kd_end and curriculum["enabled"]
        if extra:
            assert set(extra) == {"on_policy_fraction"} and not changed
            shares.append(extra["on_policy_fraction"])
        else:
            assert changed == {"token_weighting"} and curriculum["weights"]["token_weighting"] == 1.0
    assert shares == [0.25, 0.5]
