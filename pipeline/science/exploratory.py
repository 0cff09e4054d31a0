"""Exploratory checks of the science report, added after results were seen (PROTOCOL.md Revision 6).

No pre-registered claim rests on them; they help read the claims:

- **Did Bi-LoRA's auxiliary sit on its ball?** From each Bi-LoRA run's training history: the share of steps whose
  global norm c = ‖s2·B2·A2‖ (over all adapted layers) exceeded ρ before projection, and the median c/ρ over the
  second half of training. If the auxiliary stays inside the ball, ρ does not bind and the run is LoRA in disguise;
  the converse does not hold: an auxiliary on its ball may still raise the loss very little. How much it raises the
  loss is not in these runs' summaries (issue 29 adds that measurement to training).
- **How tight is the projected attack?** Its loss increase over the one-step attack's, per run and radius. A ratio
  near 1 means the ascent found little beyond the first step; a large, varying ratio means the 3-step attack is a
  lower bound whose gap to the true worst case differs between models.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from pipeline.science import protocol


def _bilora_rho(s: dict[str, Any]) -> float | None:
    st = s.get("settings") or {}
    return (st.get("method_config") or {}).get("rho") if st.get("method_key") == "bilora" else None


def aux_on_ball(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> run -> {rho, seeds, clipped: [share of steps with c > rho], ratio: [median c/rho, second half]}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for s in sorted(runs, key=lambda r: (r["task"], r["method"], r["seed"])):
        rho = _bilora_rho(s)
        steps = [h for h in s.get("history") or [] if "aux_norm" in h]
        if s.get("phase") != "sweep" or not rho or not steps:
            continue
        cell = out.setdefault(s["task"], {}).setdefault(s["method"], {"rho": rho, "seeds": [], "clipped": [], "ratio": []})
        cell["seeds"].append(s["seed"])
        cell["clipped"].append(sum(h.get("aux_clipped", 0.0) > 0 for h in steps) / len(steps))
        cell["ratio"].append(statistics.median(h["aux_norm"] for h in steps[len(steps) // 2 :]) / rho)
    return out


def attack_tightness(runs: list[dict[str, Any]], ball) -> dict[str, dict[str, dict[float, list[float]]]]:
    """task -> run -> radius -> [projected ÷ one-step increase per seed] (runs whose one-step increase is > 0)."""
    out: dict[str, dict[str, dict[float, list[float]]]] = {}
    for s in sorted(runs, key=lambda r: (r["task"], r["method"], r["seed"])):
        if s.get("phase") != "sweep":
            continue
        for rad, b in sorted(ball(s).items()):
            if b["one_step"] > 0:
                out.setdefault(s["task"], {}).setdefault(s["method"], {}).setdefault(rad, []).append(b["pgd"] / b["one_step"])
    return out


def _span(xs: list[float], fmt: str) -> str:
    return f"{statistics.fmean(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def markdown(runs: list[dict[str, Any]], ball) -> list[str]:
    aux, tight = aux_on_ball(runs), attack_tightness(runs, ball)
    if not aux and not tight:
        return []
    md = ["## Exploratory (PROTOCOL.md Revision 6, added after the results were seen; no claim rests on it)", ""]
    if aux:
        md += [
            "**Did the auxiliary sit on its ball?** c = global norm of s2·B2·A2 over all adapted layers, before the "
            "projection; mean over seeds (min-max). Sitting on the ball shows that ρ bound the auxiliary's norm, not that the "
            "auxiliary was adversarial: how much it raised the training loss was not measured in these runs.",
            "",
            "| task | run | ρ | seeds | steps with c > ρ (projected) | median c/ρ, second half of training |",
            "|---|---|---|---|---|---|",
        ]
        for task, cells in aux.items():
            for method, c in cells.items():
                md.append(
                    f"| {task} | {method} | {c['rho']:g} | {len(c['seeds'])} | {_span([x * 100 for x in c['clipped']], '.0f')} % "
                    f"| {_span(c['ratio'], '.3f')} |"
                )
        md.append("")
    if tight:
        radii = sorted({rad for cells in tight.values() for by_r in cells.values() for rad in by_r})
        md += [
            "**How tight is the projected attack?** Projected ÷ one-step loss increase, mean over seeds (min-max). "
            "The projected attack (3 steps, 1 restart) is a lower bound on the worst case in the ball; where this ratio "
            "differs between runs, so may the gap to the true worst case, and H1's differences carry that uncertainty too.",
            "",
            "| task | run | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
            "|---|---|" + "---|" * len(radii),
        ]
        order = {m: i for i, m in enumerate(protocol.SEEDS)}
        for task, cells in tight.items():
            for method in sorted(cells, key=lambda m: order.get(m, math.inf)):
                row = " | ".join(_span(cells[method][r], ".2f") if r in cells[method] else "-" for r in radii)
                md.append(f"| {task} | {method} | {row} |")
        md.append("")
    return md
