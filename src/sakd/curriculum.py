"""The curriculum: loss weights, distillation temperature, router temperature and top-k as ONE pure function
of training progress = optimizer_step / total_optimizer_steps.

Training and evaluation both call `curriculum_at` with the same progress, so they weigh losses identically (an
evaluation loss weighed otherwise would not be comparable with the training loss). Default phases: phase 1
(progress 0-0.3) KD + LM; phase 2 (0.3-0.6) adds feature and attention transfer; phase 3 (0.6-1) adds the
router (its feature loss and token weights), load balance, layerwise and contrastive losses. A loss joining at
phase start s ramps in linearly over [s, s + ramp]: weight 0 at or before s (a phase-2 loss is exactly 0
throughout phase 1), its full weight from s + ramp on. With the default ramp 0.05: at 29% the feature weight
is 0, at 31% it is 0.2 of its full weight, at 35% full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LOSS_NAMES = (
    "kd",
    "lm",
    "feature",
    "attention",
    "router",
    "balance",
    "layerwise",
    "contrastive",
    "token_weighting",
)
# Everything beside KD and LM: each of these needs the distillation heads (router, projections).
AUX_LOSSES = LOSS_NAMES[2:]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The weights of the full student-aware objective (`sakd ablate` measures each part against plain KD). The
# auxiliary losses are O(1) by construction (rows in [0, 4]); the balance loss is >= 1 with its minimum at
# uniform routing, hence its small weight (as in Switch).
ALL_LOSSES_ON = {
    "kd": 1.0,
    "lm": 1.0,
    "feature": 0.5,
    "attention": 0.5,
    "router": 0.5,
    "balance": 0.01,
    "layerwise": 0.5,
    "contrastive": 0.1,
    "token_weighting": 1.0,
}
ALL_LOSSES_PHASES = {"token_weighting": 3}


class LossWeights(_Section):
    """Each loss's full weight once ramped in; 0 switches a loss off for the whole run. The defaults follow
    the ablation on the demo (`sakd ablate`, see the README): plain KD + LM. The routed-feature, feature,
    attention, layer-wise and contrastive losses did not beat plain KD there; the student-aware token
    weights gained 0.007 bits per byte (one seed, before they were made to rise with the knowledge gap) for
    a third more time per step. All are off unless given a weight."""

    kd: float = Field(1.0, ge=0.0)
    """Distillation loss on the teacher's next-token distribution (with two tokenizers the chunk-likelihood
    term scales with it): its full weight, from which it fades by `kd_end` (by default to 0 at the end)."""
    lm: float = Field(1.0, ge=0.0)
    """Next-token cross-entropy on the data."""
    feature: float = Field(0.0, ge=0.0)
    """Hidden-state transfer on aligned groups (final states, learned projection)."""
    attention: float = Field(0.0, ge=0.0)
    """Attention-map transfer on aligned groups (needs eager attention)."""
    router: float = Field(0.0, ge=0.0)
    """The student-aware router's routed-feature loss (and its capacity probe); its ramp also blends the KD
    token weights in."""
    balance: float = Field(0.0, ge=0.0)
    """Switch load-balance loss of the router."""
    layerwise: float = Field(0.0, ge=0.0)
    """Hidden-state transfer between mapped intermediate layers."""
    contrastive: float = Field(0.0, ge=0.0)
    """InfoNCE between pooled student and teacher window representations."""
    token_weighting: float = Field(0.0, ge=0.0, le=1.0)
    """Strength (0-1) with which the router's KD token weights (from knowledge gap and capacity) replace
    uniform weights; its capacity probe trains with the same weight."""


class LossPhases(_Section):
    """The phase (1-based) at whose start each loss begins to ramp in."""

    kd: int = Field(1, ge=1)
    lm: int = Field(1, ge=1)
    feature: int = Field(2, ge=1)
    attention: int = Field(2, ge=1)
    router: int = Field(3, ge=1)
    balance: int = Field(3, ge=1)
    layerwise: int = Field(3, ge=1)
    contrastive: int = Field(3, ge=1)
    token_weighting: int = Field(1, ge=1)


class CurriculumSpec(_Section):
    """How loss weights, temperatures and the router's top-k change with progress (config `curriculum:`)."""

    enabled: bool = True
    """false: no phases, ramps or KD fade; every loss at its full weight and temperatures and top-k at their end
    values from the first step (the no-curriculum ablation)."""
    weights: LossWeights = Field(default_factory=LossWeights)
    """Full weight of each loss."""
    phases: LossPhases = Field(default_factory=LossPhases)
    """Phase at whose start each loss joins."""
    phase_starts: list[float] = Field(default_factory=lambda: [0.3, 0.6])
    """Progress at which phases 2, 3, ... begin: strictly increasing, in (0, 1). Phase 1 starts at 0."""
    ramp: float = Field(0.05, ge=0.0, le=0.5)
    """Width (in progress) of the linear ramp of a loss joining after phase 1; 0 switches it on at once."""
    kd_end: float = Field(0.0, ge=0.0)
    """KD's weight at the end of training as a fraction of its full weight: from KD's start it moves linearly
    (or along `temperature_schedule`) from the full weight to this fraction of it by progress 1; 1 keeps it
    constant. The chunk-likelihood term, which scales with KD's weight, fades with it. The default, 1 fading
    to 0, lets the teacher's pull give way to the data as the student learns: on a real pretrained pair
    (Gemma 3 270M into a pruned SmolLM2-135M, 30 steps, four seeds) it beat a constant 0.5 and training alone
    on every seed, and on the full demo it closed more of the gap to the teacher. At 60 steps it beat
    training alone on all four seeds (see the README)."""
    kd_fade_until: float = Field(1.0, gt=0.0, le=1.0)
    """Progress by which KD's fade reaches `kd_end`; it stays there after. With `kd_end` 0 the teacher does not
    run from then on (unless another loss reads it), so the rest of training costs what training alone does."""
    temperature_start: float = Field(1.0, gt=0.0)
    """Distillation temperature at progress 0."""
    temperature_end: float = Field(1.0, gt=0.0)
    """Distillation temperature at progress 1 (equal to the start: constant; e.g. 2.0 -> 1.0 anneals)."""
    temperature_schedule: Literal["linear", "cosine"] = "linear"
    """Interpolation between the start and end temperatures (both router and distillation)."""
    router_temperature_start: float = Field(1.0, gt=0.0)
    """Router softmax temperature at progress 0 (scores are already divided by sqrt(d))."""
    router_temperature_end: float = Field(1.0, gt=0.0)
    """Router softmax temperature at progress 1."""
    top_k_start: int = Field(1, ge=1)
    """Sources each group is routed to when top-k growth begins."""
    top_k_end: int = Field(4, ge=1)
    """Sources at the end of training (capped by the number of sources in the router)."""
    top_k_growth: tuple[float, float] | None = None
    """Progress interval over which top-k grows in equal steps from start to end; null: from the start of the
    router's phase to the end of training."""

    @model_validator(mode="after")
    def _consistent(self) -> CurriculumSpec:
        problems = []
        starts = self.phase_starts
        if any(not 0.0 < s < 1.0 for s in starts) or any(
            b <= a for a, b in zip(starts[:-1], starts[1:], strict=True)
        ):
            problems.append(f"phase_starts must be strictly increasing values in (0, 1), got {starts}")
        last_phase = len(starts) + 1
        late = {name: p for name, p in self.phases.model_dump().items() if p > last_phase}
        if late:
            problems.append(f"phases {late} exceed the {last_phase} phases that phase_starts {starts} define")
        if self.top_k_end < self.top_k_start:
            problems.append(f"top_k_end {self.top_k_end} must be >= top_k_start {self.top_k_start}")
        if self.top_k_growth is not None and not 0.0 <= self.top_k_growth[0] < self.top_k_growth[1] <= 1.0:
            problems.append(f"top_k_growth must be an interval 0 <= from < to <= 1, got {self.top_k_growth}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class CurriculumPoint:
    """The curriculum at one progress value.

    weights: each loss's weight now (LOSS_NAMES keys; token_weighting's is the strength with which the
    router's KD token weights replace uniform ones); fraction: how far each loss has ramped in, in [0, 1];
    temperature: distillation temperature;
    router_temperature and top_k: the router's softmax temperature and number of sources; phase: 1-based.
    """

    weights: dict[str, float]
    fraction: dict[str, float]
    temperature: float
    router_temperature: float
    top_k: int
    phase: int
    progress: float = 0.0  # where in training this point lies, in [0, 1]

    def log_values(self) -> dict[str, float]:
        """Flat values for the metrics log."""
        values = {f"curriculum/{name}": weight for name, weight in self.weights.items()}
        values.update(
            {
                "curriculum/temperature": self.temperature,
                "curriculum/router_temperature": self.router_temperature,
                "curriculum/top_k": float(self.top_k),
                "curriculum/phase": float(self.phase),
            }
        )
        return values


def training_progress(optimizer_step: int, total_optimizer_steps: int) -> float:
    """optimizer_step / total_optimizer_steps, checked; both count OPTIMIZER steps (not micro-batches)."""
    if total_optimizer_steps < 1 or not 0 <= optimizer_step <= total_optimizer_steps:
        raise ValueError(
            f"optimizer step {optimizer_step} is outside 0..{total_optimizer_steps}: progress is counted in "
            "optimizer steps over the planned total"
        )
    return optimizer_step / total_optimizer_steps


def _interpolate(start: float, end: float, progress: float, schedule: str) -> float:
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start + (end - start) * progress


def _phase_start(spec: CurriculumSpec, phase: int) -> float:
    return 0.0 if phase == 1 else spec.phase_starts[phase - 2]


def _ramp_fraction(progress: float, start: float, width: float) -> float:
    """0 at or before `start`, 1 from start + width on, linear between; a loss joining at 0 is on at once."""
    if start == 0.0:
        return 1.0
    if width == 0.0:
        return 1.0 if progress > start else 0.0
    return min(max((progress - start) / width, 0.0), 1.0)


def _top_k(spec: CurriculumSpec, progress: float) -> int:
    low, high = spec.top_k_growth or (_phase_start(spec, spec.phases.router), 1.0)
    steps = spec.top_k_end - spec.top_k_start + 1  # equal intervals, one per k
    u = min(max((progress - low) / (high - low), 0.0), 1.0)
    return min(spec.top_k_start + int(u * steps), spec.top_k_end)


def _kd_fade(spec: CurriculumSpec, progress: float, start: float) -> float:
    """The factor on KD's weight: 1 until KD's phase starts, then towards `kd_end` at `kd_fade_until`, and
    `kd_end` after (a fade that would end before KD starts ends at progress 1 instead)."""
    if spec.kd_end == 1.0 or progress <= start:
        return 1.0
    until = spec.kd_fade_until if spec.kd_fade_until > start else 1.0
    position = min((progress - start) / (until - start), 1.0)
    return _interpolate(1.0, spec.kd_end, position, spec.temperature_schedule)


def curriculum_at(progress: float, spec: CurriculumSpec) -> CurriculumPoint:
    """The curriculum at `progress` in [0, 1] (see `training_progress`). Pure: same input, same output."""
    if not 0.0 <= progress <= 1.0:  # also refuses NaN
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    full = spec.weights.model_dump()
    if not spec.enabled:
        return CurriculumPoint(
            weights=dict(full),
            fraction={name: 1.0 for name in LOSS_NAMES},
            temperature=spec.temperature_end,
            router_temperature=spec.router_temperature_end,
            top_k=spec.top_k_end,
            phase=len(spec.phase_starts) + 1,
            progress=progress,
        )
    phases = spec.phases.model_dump()
    fraction = {
        name: _ramp_fraction(progress, _phase_start(spec, phases[name]), spec.ramp) for name in LOSS_NAMES
    }
    schedule = spec.temperature_schedule
    weights = {name: full[name] * fraction[name] for name in LOSS_NAMES}
    weights["kd"] *= _kd_fade(spec, progress, _phase_start(spec, phases["kd"]))
    return CurriculumPoint(
        weights=weights,
        fraction=fraction,
        temperature=_interpolate(spec.temperature_start, spec.temperature_end, progress, schedule),
        router_temperature=_interpolate(
            spec.router_temperature_start, spec.router_temperature_end, progress, schedule
        ),
        top_k=_top_k(spec, progress),
        phase=1 + sum(progress >= start for start in spec.phase_starts),
        progress=progress,
    )
