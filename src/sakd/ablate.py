"""`sakd ablate`: what each student-aware part is worth, measured on the demo's setup.

Every variant distils the same teacher into the same student with the same steps, data and seed; only the
loss configuration differs. The table reports held-out bits per byte (the better of raw and EMA weights, as
`final/` exports) and training tokens/s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sakd.curriculum import ALL_LOSSES_ON, ALL_LOSSES_PHASES, AUX_LOSSES
from sakd.demo import prepare


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


def _tokens_per_s(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r.get("event") == "train"]
    return sum(rates) / len(rates)


def run_ablation(workdir: str | Path, quick: bool = False, variants: list[str] | None = None) -> list[dict]:
    setup = prepare(workdir, quick)
    rows = []
    names = ["LM only (baseline)", *(variants or VARIANTS)]
    for i, name in enumerate(names):
        slug = "ablate-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        print(f"[{i + 1}/{len(names)}] {name}")
        if name.startswith("LM only"):
            summary = setup.student_run(slug, teacher=False)
        else:
            summary = setup.student_run(slug, curriculum=VARIANTS[name])
        rows.append(
            {
                "variant": name,
                "bits_per_byte": summary["final"]["bits_per_byte"],
                "weights": summary["final"]["weights"],
                "tokens_per_s": round(_tokens_per_s(setup.work / slug)),
            }
        )
    table = ["| variant | held-out bits per byte | tokens/s |", "|---|---|---|"]
    table += [
        f"| {r['variant']} | {r['bits_per_byte']:.4f} ({r['weights']}) | {r['tokens_per_s']} |" for r in rows
    ]
    (setup.work / "ablation.json").write_text(json.dumps(rows, indent=1))
    (setup.work / "ablation.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return rows
