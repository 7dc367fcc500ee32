"""The curriculum: phases, ramps, temperature and top-k as one pure function of optimizer-step progress."""

import pytest
from pydantic import ValidationError

from sakd.curriculum import (
    ALL_LOSSES_ON,
    ALL_LOSSES_PHASES,
    LOSS_NAMES,
    CurriculumSpec,
    curriculum_at,
    training_progress,
)

# The full student-aware curriculum (every loss on, KD constant); the shipped defaults switch the losses that did not
# measure better off, which test_defaults_are_the_measured_winner checks.
SPEC = CurriculumSpec(weights=ALL_LOSSES_ON, phases=ALL_LOSSES_PHASES, kd_end=1.0)
FULL = SPEC.weights.model_dump()
PHASE1 = {"kd", "lm"}
PHASE2 = {"feature", "attention"}
PHASE3 = {"router", "balance", "layerwise", "contrastive", "token_weighting"}


def _weights(progress: float, spec: CurriculumSpec = SPEC) -> dict[str, float]:
    return curriculum_at(progress, spec).weights


def test_loss_names_cover_every_phase():
    assert set(LOSS_NAMES) == PHASE1 | PHASE2 | PHASE3
    assert all(FULL[name] > 0 for name in LOSS_NAMES)


@pytest.mark.parametrize("progress", [0.0, 0.29])
def test_phase_one_is_kd_and_lm_only(progress):
    point = curriculum_at(progress, SPEC)
    assert point.phase == 1
    assert {name for name, w in point.weights.items() if w > 0} == PHASE1
    assert all(point.weights[name] == FULL[name] for name in PHASE1)


def test_documented_values_around_the_first_boundary():
    """Default ramp 0.05 starting at 0.3: 0 at 29%, 0.2 of full at 31%, full from 35%."""
    assert all(_weights(0.29)[name] == 0.0 for name in PHASE2)
    at_31 = curriculum_at(0.31, SPEC)
    assert at_31.phase == 2
    for name in PHASE2:
        assert at_31.weights[name] == pytest.approx(0.2 * FULL[name])
        assert at_31.fraction[name] == pytest.approx(0.2)
        assert _weights(0.35)[name] == pytest.approx(FULL[name])
    assert all(at_31.weights[name] == 0.0 for name in PHASE3)


def test_phase_three_boundary():
    at_59, at_61 = curriculum_at(0.59, SPEC), curriculum_at(0.61, SPEC)
    assert at_59.phase == 2 and at_61.phase == 3
    for name in PHASE3:
        assert at_59.weights[name] == 0.0
        assert at_61.weights[name] == pytest.approx(0.2 * FULL[name])
    for name in PHASE1 | PHASE2:
        assert at_59.weights[name] == at_61.weights[name] == FULL[name]


def test_everything_on_at_the_end():
    point = curriculum_at(1.0, SPEC)
    assert point.phase == 3 and point.weights == FULL
    assert point.top_k == 4


@pytest.mark.parametrize("ramp", [0.0, 0.02, 0.1, 0.2])
def test_ramps_are_linear_and_between(ramp):
    spec = CurriculumSpec(weights=ALL_LOSSES_ON, phases=ALL_LOSSES_PHASES, ramp=ramp)
    for name in PHASE2:
        assert _weights(0.3, spec)[name] == 0.0
        assert _weights(0.3 + ramp + 1e-9, spec)[name] == pytest.approx(FULL[name])
    if ramp:
        inside = [0.3 + ramp * f for f in (0.25, 0.5, 0.75)]
        values = [_weights(p, spec)["feature"] for p in inside]
        assert values == pytest.approx([FULL["feature"] * f for f in (0.25, 0.5, 0.75)])
        assert all(0 < v < FULL["feature"] for v in values)


def test_weights_never_decrease():
    grid = [i / 200 for i in range(201)]
    for name in LOSS_NAMES:
        values = [_weights(p)[name] for p in grid]
        assert values == sorted(values)


def test_top_k_grows_monotonically_from_one_to_four():
    grid = [i / 400 for i in range(401)]
    ks = [curriculum_at(p, SPEC).top_k for p in grid]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == 4 and set(ks) == {1, 2, 3, 4}
    # It grows during the router's phase, in equal steps.
    assert curriculum_at(0.59, SPEC).top_k == 1
    assert [curriculum_at(p, SPEC).top_k for p in (0.65, 0.75, 0.85, 0.95)] == [1, 2, 3, 4]
    custom = CurriculumSpec(top_k_start=2, top_k_end=3, top_k_growth=(0.0, 0.5))
    assert [curriculum_at(p, custom).top_k for p in (0.0, 0.2, 0.3, 1.0)] == [2, 2, 3, 3]


def test_temperature_schedules():
    spec = CurriculumSpec(temperature_start=2.0, temperature_end=1.0, router_temperature_end=0.5)
    assert curriculum_at(0.0, spec).temperature == 2.0
    assert curriculum_at(0.5, spec).temperature == pytest.approx(1.5)
    assert curriculum_at(1.0, spec).temperature == 1.0
    assert curriculum_at(1.0, spec).router_temperature == 0.5
    cosine = spec.model_copy(update={"temperature_schedule": "cosine"})
    assert curriculum_at(0.25, cosine).temperature > curriculum_at(0.25, spec).temperature
    assert curriculum_at(0.5, cosine).temperature == pytest.approx(1.5)
    assert curriculum_at(0.7, SPEC).temperature == 1.0  # the default is constant


def test_kd_fades_to_its_end_fraction():
    spec = CurriculumSpec(weights={"kd": 0.8, "lm": 1.0}, kd_end=0.25)
    assert [curriculum_at(p, spec).weights["kd"] for p in (0.0, 0.5, 1.0)] == pytest.approx([0.8, 0.5, 0.2])
    assert curriculum_at(0.5, spec).weights["lm"] == 1.0  # only KD fades
    assert curriculum_at(0.5, CurriculumSpec(weights={"kd": 0.8}, kd_end=1.0)).weights["kd"] == 0.8
    assert curriculum_at(0.5, CurriculumSpec()).weights["kd"] == 0.5  # the default: 1 fading to 0
    late = CurriculumSpec(weights={"kd": 0.8}, kd_end=0.25, phases={"kd": 2}, ramp=0.0)  # from its own start
    assert curriculum_at(0.3, late).weights["kd"] == 0.0
    assert curriculum_at(0.65, late).weights["kd"] == pytest.approx(0.8 * (1 - 0.75 * 0.5))
    assert curriculum_at(0.5, spec.model_copy(update={"enabled": False})).weights["kd"] == 0.8


def test_kd_fade_ends_at_its_point_and_stays():
    spec = CurriculumSpec(weights={"kd": 1.0}, kd_end=0.0, kd_fade_until=0.5)
    weights = [curriculum_at(p, spec).weights["kd"] for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert weights == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0])
    late = CurriculumSpec(weights={"kd": 1.0}, kd_end=0.0, kd_fade_until=0.5, phases={"kd": 2}, ramp=0.0)
    assert curriculum_at(0.4, late).weights["kd"] == pytest.approx(0.5)  # from 0.3 to 0.5
    too_early = late.model_copy(update={"kd_fade_until": 0.2})  # ends before KD starts: fades to the end
    assert curriculum_at(0.65, too_early).weights["kd"] == pytest.approx(0.5)


def test_pure():
    for progress in (0.0, 0.31, 0.612, 1.0):
        assert curriculum_at(progress, SPEC) == curriculum_at(progress, SPEC)
    spec = CurriculumSpec()
    before = spec.model_dump()
    curriculum_at(0.5, spec)
    assert spec.model_dump() == before


def test_disabled_parts_stay_zero():
    spec = CurriculumSpec(
        weights={**ALL_LOSSES_ON, "attention": 0.0, "contrastive": 0.0}, phases=ALL_LOSSES_PHASES
    )
    for progress in (0.0, 0.31, 0.5, 0.7, 1.0):
        weights = _weights(progress, spec)
        assert weights["attention"] == 0.0 and weights["contrastive"] == 0.0
    assert _weights(1.0, spec)["feature"] == FULL["feature"]


def test_curriculum_off_gives_full_weights_from_the_start():
    spec = CurriculumSpec(enabled=False, weights=ALL_LOSSES_ON, temperature_start=3.0, temperature_end=1.5)
    point = curriculum_at(0.0, spec)
    assert point.weights == FULL and point.top_k == 4 and point.temperature == 1.5


def test_custom_phases():
    spec = CurriculumSpec(
        weights=ALL_LOSSES_ON,
        kd_end=1.0,
        phase_starts=[0.5],
        phases={
            "feature": 2,
            "attention": 2,
            "router": 2,
            "balance": 2,
            "layerwise": 2,
            "contrastive": 2,
            "token_weighting": 2,
        },
        ramp=0.0,
    )
    assert set(k for k, w in _weights(0.49, spec).items() if w) == PHASE1
    assert _weights(0.51, spec) == FULL
    assert curriculum_at(0.51, spec).phase == 2


def test_spec_validation():
    with pytest.raises(ValidationError, match="unknown|extra"):
        CurriculumSpec(rampp=0.1)
    with pytest.raises(ValidationError, match="extra"):
        CurriculumSpec(weights={"kd": 1.0, "distill": 2.0})
    with pytest.raises(ValidationError, match="strictly increasing"):
        CurriculumSpec(phase_starts=[0.6, 0.3])
    with pytest.raises(ValidationError, match="exceed"):
        CurriculumSpec(phase_starts=[0.5])  # phase 3 losses with only 2 phases
    with pytest.raises(ValidationError, match="top_k_end"):
        CurriculumSpec(top_k_start=4, top_k_end=2)
    with pytest.raises(ValidationError):
        CurriculumSpec(weights={"kd": -1.0})
    with pytest.raises(ValueError, match="progress"):
        curriculum_at(1.01, SPEC)
    with pytest.raises(ValueError, match="progress"):
        curriculum_at(float("nan"), SPEC)


def test_training_progress_counts_optimizer_steps():
    assert training_progress(0, 10) == 0.0
    assert training_progress(3, 12) == 0.25
    assert training_progress(10, 10) == 1.0
    with pytest.raises(ValueError, match="optimizer steps"):
        training_progress(11, 10)
    with pytest.raises(ValueError):
        training_progress(0, 0)


def test_log_values():
    values = curriculum_at(0.7, SPEC).log_values()
    assert values["curriculum/kd"] == 1.0 and values["curriculum/phase"] == 3.0
    assert set(values) >= {f"curriculum/{name}" for name in LOSS_NAMES}


def test_defaults_are_the_measured_winner():
    """KD + LM: no auxiliary loss beat them per unit of compute on the demo (README, ablation); KD starts at
    weight 1 and fades to 0, which beat a constant weight on the real pair and the full demo."""
    point = curriculum_at(0.0, CurriculumSpec())
    assert {name for name, w in point.weights.items() if w > 0} == {"kd", "lm"}
    assert point.weights["kd"] == 1.0
    end = curriculum_at(1.0, CurriculumSpec()).weights
    assert end == {**point.weights, "kd": 0.0}


def test_progress_bar_shows_the_phase_only_when_phases_train_differently():
    from types import SimpleNamespace

    from sakd.train.loop import _phases_differ

    def cfg(spec):
        return SimpleNamespace(curriculum=spec)

    assert not _phases_differ(cfg(CurriculumSpec()))  # plain KD: the phase changes nothing
    assert _phases_differ(cfg(SPEC))
    assert _phases_differ(cfg(CurriculumSpec(temperature_start=3.0, temperature_end=1.0)))
