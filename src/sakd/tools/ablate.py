"""`sakd ablate`: what each student-aware part is worth, measured on the demo's setup.

Every variant distils the same teacher into the same student with the same steps, data and seed; only the
loss configuration differs. The table reports held-out bits per byte (the better of raw and EMA weights, as
`final/` exports) and training tokens/s. With several seeds (`--seeds N`: 0..N-1) every variant runs on each;
the table gives mean +- standard deviation and the paired difference against plain KD on the same seed, whose
standard error says whether a gain is more than seed noise.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from sakd.curriculum import ALL_LOSSES_ON, ALL_LOSSES_PHASES, AUX_LOSSES, CurriculumSpec
from sakd.tools.demo import prepare


def _only(*keep: str) -> dict[str, Any]:
    """No phases: the listed auxiliary losses at their full weights from the first step, the others off."""
    return {
        "enabled": False,
        "weights": {k: w if k in keep or k not in AUX_LOSSES else 0.0 for k, w in ALL_LOSSES_ON.items()},
    }


VARIANTS: dict[str, dict[str, Any]] = {
    "plain KD": _only(),
    "KD + token weights": _only("token_weighting"),
    "KD + token weights + router/feature": _only("token_weighting", "router", "balance", "feature"),
    "KD + all auxiliary losses": _only(*AUX_LOSSES),
    "full curriculum": {"enabled": True, "weights": ALL_LOSSES_ON, "phases": ALL_LOSSES_PHASES},
}

REFERENCE = "plain KD"
BASELINE = "LM only (baseline)"

# Every variant but the default runs plain KD: without the chunk-likelihood term and with the projected KD
# at every group end, so that each is compared with plain KD.
PLAIN = {"chunk_likelihood_weight": 0.0, "projection_rows": "all"}

# Plain KD's losses with another divergence or another term: (distill settings). akl needs one vocabulary, and
# the demo's two models have different tokenizers, so it is not among them.
_TERM = {"chunk_likelihood_weight": 1.0, "projection_rows": "consistent"}


def _term_name(kd: float, kd_end: float) -> str:
    """The chunk-likelihood objective's name under one KD schedule (its weight, and `kd_end` when it fades)."""
    fade = "" if kd_end == 1.0 else f" fading to {kd * kd_end:g}"
    return f"KD + chunk likelihood, consistent rows, KD weight {kd:g}{fade}"


_DEFAULTS = CurriculumSpec()
DEFAULT_KD = (_DEFAULTS.weights.kd, _DEFAULTS.kd_end)
DEFAULT_OBJECTIVE = f"{_term_name(*DEFAULT_KD)} (the default)"
# The term's objectives by their KD schedule: (KD weight, kd_end); the default's is the default's.
_TERM_SCHEDULES = {DEFAULT_OBJECTIVE: DEFAULT_KD} | {
    _term_name(*schedule): schedule
    for schedule in ((1.0, 0.0), (0.5, 1.0), (1.0, 1.0))
    if schedule != DEFAULT_KD
}
# GKD's mixed distillation on top of the default: that share of micro-batches is the student's own text
ON_POLICY = {
    f"the default + the student's own text in {share:.0%} of micro-batches (on-policy, GKD lambda {share:g})": share
    for share in (0.25, 0.5)
}
# The student-aware token weights on top of the default (a curriculum weight, not a distill setting)
TOKEN_WEIGHTS_ON_DEFAULT = "the default + student-aware token weights"
_TERM_SCHEDULES |= dict.fromkeys([*ON_POLICY, TOKEN_WEIGHTS_ON_DEFAULT], DEFAULT_KD)
_EXTRA_WEIGHTS = {TOKEN_WEIGHTS_ON_DEFAULT: {"token_weighting": 1.0}}
OBJECTIVES: dict[str, dict[str, Any]] = {
    **dict.fromkeys(_TERM_SCHEDULES, _TERM),
    **{name: {**_TERM, "on_policy_fraction": share} for name, share in ON_POLICY.items()},
    "KD with TAID's target (t 0.4 -> 1)": {**PLAIN, "divergence": "taid"},
    "KD with skew KL (alpha 0.1)": {**PLAIN, "divergence": "skew_kl"},
}


def objective_curriculum(name: str) -> dict[str, Any]:
    """Plain KD's curriculum, with the objective's own KD schedule where it has one (the curriculum on, for
    KD's fade; with only KD and LM weighted it changes nothing else)."""
    plain = VARIANTS[REFERENCE]
    if name not in _TERM_SCHEDULES:
        return plain
    kd, kd_end = _TERM_SCHEDULES[name]
    weights = {**plain["weights"], "kd": kd, **_EXTRA_WEIGHTS.get(name, {})}
    return {"enabled": True, "weights": weights, "kd_end": kd_end}


def variant_names() -> list[str]:
    """Every variant `sakd ablate` knows, in the order it runs them."""
    return [*VARIANTS, *OBJECTIVES]


def _tokens_per_s(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r.get("event") == "train"]
    return sum(rates) / len(rates)


def run_ablation(
    workdir: str | Path, quick: bool = False, variants: list[str] | None = None, seeds: int = 1
) -> list[dict] | dict[str, Any]:
    """Run the LM-only baseline and each variant on seeds 0..seeds-1; write ablation.json and ablation.md in
    the work folder and print the table. One seed: a row per variant. Several: `aggregate_seeds`' summary
    (plain KD always runs then, as the reference of the paired differences)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    setup = prepare(workdir, quick)
    names = [BASELINE, *(variants or variant_names())]
    if seeds > 1 and REFERENCE not in names:
        names.insert(1, REFERENCE)
    rows = []
    for seed in range(seeds):
        for i, name in enumerate(names):
            slug = "ablate-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
            slug += f"-seed{seed}" if seed else ""  # seed 0 keeps the folders of single-seed ablations
            print(f"[{i + 1}/{len(names)}] {name}" + (f" (seed {seed})" if seeds > 1 else ""))
            if name == BASELINE:
                summary = setup.student_run(slug, teacher=False, seed=seed)
            elif name in OBJECTIVES:
                summary = setup.student_run(
                    slug, curriculum=objective_curriculum(name), distill=OBJECTIVES[name], seed=seed
                )
            else:
                summary = setup.student_run(slug, curriculum=VARIANTS[name], distill=PLAIN, seed=seed)
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "bits_per_byte": summary["final"]["bits_per_byte"],
                    "weights": summary["final"]["weights"],
                    "tokens_per_s": round(_tokens_per_s(setup.work / slug)),
                }
            )
    if seeds > 1:
        result = aggregate_seeds(rows)
        table = seeds_table(result)
    else:
        result = [{k: v for k, v in r.items() if k != "seed"} for r in rows]
        table = _single_seed_table(result)
    (setup.work / "ablation.json").write_text(json.dumps(result, indent=1))
    (setup.work / "ablation.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return result


def _single_seed_table(rows: list[dict]) -> list[str]:
    table = ["| variant | held-out bits per byte | tokens/s |", "|---|---|---|"]
    table += [
        f"| {r['variant']} | {r['bits_per_byte']:.4f} ({r['weights']}) | {r['tokens_per_s']} |" for r in rows
    ]
    return table


def _spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and standard error of the mean (0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "stderr": std / math.sqrt(len(values))}


def aggregate_seeds(rows: list[dict], reference: str = REFERENCE) -> dict[str, Any]:
    """Per variant over seeds: held-out bits per byte per seed, mean and standard deviation, and the paired
    difference against `reference` on the same seed (variant - reference: negative is a gain) with its mean,
    standard deviation and standard error; `significant_gain`: the mean gain exceeds two standard errors.

    rows: {"variant", "seed", "bits_per_byte", "tokens_per_s", ...} per run; every variant must have run on
    the reference's seeds."""
    by_variant: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    if reference not in by_variant:
        raise ValueError(f"the reference variant {reference!r} has no runs")
    seeds = sorted(by_variant[reference])
    variants = []
    for name, runs in by_variant.items():
        if sorted(runs) != seeds:
            raise ValueError(f"{name!r} ran on seeds {sorted(runs)}, the reference on {seeds}")
        bpb = [runs[s]["bits_per_byte"] for s in seeds]
        diffs = [runs[s]["bits_per_byte"] - by_variant[reference][s]["bits_per_byte"] for s in seeds]
        spread, paired = _spread(bpb), _spread(diffs)
        variants.append(
            {
                "variant": name,
                "bits_per_byte": bpb,
                "mean": spread["mean"],
                "std": spread["std"],
                "tokens_per_s": round(statistics.fmean(runs[s]["tokens_per_s"] for s in seeds)),
                "vs_reference": {"per_seed": diffs, **paired},
                # a single seed has no standard error: no gain can be told from noise
                "significant_gain": len(seeds) > 1 and -paired["mean"] > 2 * paired["stderr"],
            }
        )
    return {"seeds": seeds, "reference": reference, "variants": variants}


def seeds_table(result: dict[str, Any]) -> list[str]:
    """The Markdown table of `aggregate_seeds`' result."""
    n, reference = len(result["seeds"]), result["reference"]
    table = [
        f"| variant | held-out bits per byte, mean +- std ({n} seeds) | vs {reference}, paired mean +- std "
        "error | gain > 2 std errors | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        d = v["vs_reference"]
        table.append(
            f"| {v['variant']} | {v['mean']:.4f} +- {v['std']:.4f} | {d['mean']:+.4f} +- {d['stderr']:.4f} | "
            f"{'yes' if v['significant_gain'] else 'no'} | {v['tokens_per_s']} |"
        )
    return table
