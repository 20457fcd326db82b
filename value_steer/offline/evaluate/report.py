"""The markdown report and JSON of a finished run: headline against the target, threshold transfer
between the splits, the per-condition tables, plots and examples."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from value_steer.offline.assets import TEMPERATURE, TOP_P
from value_steer.offline.evaluate.plan import MAX_NUM_SEQS
from value_steer.offline.evaluate.plots import plot


def _fmt(m: dict[str, Any], digits: int = 3) -> str:
    v, (lo, hi) = m["value"], m["ci"]
    if not math.isfinite(v):
        return "—"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _table(conds: list[dict[str, Any]], chosen: dict[str, float]) -> list[str]:
    lines = ["| condition | n | undesirable | perplexity | length (tokens) | distinct-2 | intervention rate "
             "| tok/s |", "|---|---:|---|---|---|---|---|---:|"]
    for c in conds:
        m = c["metrics"]
        name = c["name"]
        if c["mode"] == "vfd" and chosen.get(str(c["k"])) == c["threshold"]:
            name = f"**{name}** (chosen)"
        lines.append(f"| {name} | {m['n']} | {_fmt(m['undesirable'])} | {_fmt(m['perplexity'], 2)} | "
                     f"{_fmt(m['length'], 1)} | {_fmt(m['distinct_2'])} | {_fmt(m['intervention'])} | "
                     f"{m['tok_per_s']:.1f} |")
    return lines


def within_budget(results: dict[str, Any]) -> dict[str, bool]:
    """Per K: whether the chosen threshold met the perplexity budget on calibration (else it is the
    lowest-perplexity fallback of :func:`choose_threshold`)."""
    cal = [c for c in results["conditions"] if c["split"] == "calibration"]
    base = next(c for c in cal if c["mode"] == "base")["metrics"]["perplexity"]["value"]
    limit = base * (1.0 + results["plan"]["max_ppl_increase"])
    out = {}
    for k, t in results["chosen_thresholds"].items():
        m = next(c for c in cal if c["mode"] == "vfd" and str(c["k"]) == k and c["threshold"] == t)["metrics"]
        out[k] = bool(m["perplexity"]["value"] <= limit)
    return out


# The target for VFD on test: at least this relative cut at no more than this perplexity increase.
TARGET_RELATIVE_CUT = 0.5
TARGET_MAX_PPL_INCREASE = 0.10


def effect(m: dict[str, Any], base: dict[str, Any], budget: float) -> dict[str, Any]:
    """One condition's metrics ``m`` against its split's ``base``: relative cut of the undesirable rate,
    perplexity increase, whether it is within the selection ``budget``, and whether it meets the target."""
    b, v = base["undesirable"]["value"], m["undesirable"]["value"]
    cut = (b - v) / b if b > 0 else float("nan")
    inc = m["perplexity"]["value"] / base["perplexity"]["value"] - 1.0
    return {"relative_cut": cut, "perplexity_increase": inc, "within_budget": bool(inc <= budget),
            "meets_target": bool(cut >= TARGET_RELATIVE_CUT and inc <= TARGET_MAX_PPL_INCREASE)}


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline: per K, the chosen threshold's relative cut and perplexity change on test."""
    test = [c for c in results["conditions"] if c["split"] == "test"]
    base = next(c for c in test if c["mode"] == "base")["metrics"]
    budget = within_budget(results)
    out = {}
    for k, t in results["chosen_thresholds"].items():
        m = next(c for c in test if c["mode"] == "vfd" and str(c["k"]) == k and c["threshold"] == t)["metrics"]
        e = effect(m, base, results["plan"]["max_ppl_increase"])
        out[k] = {"threshold": t, "base_undesirable": base["undesirable"]["value"],
                  "undesirable": m["undesirable"]["value"], "relative_cut": e["relative_cut"],
                  "perplexity_increase": e["perplexity_increase"], "meets_target": e["meets_target"],
                  "within_budget_on_calibration": budget[k]}
    return out


def threshold_transfer(results: dict[str, Any]) -> list[dict[str, Any]]:
    """For each (K, threshold) run on both splits: relative cut and perplexity change on calibration and on
    test, and whether each split alone meets the target. Shows whether the calibration rule could have
    found a threshold that works on test (the selection, not the head, is then what falls short)."""
    budget = results["plan"]["max_ppl_increase"]
    by_split: dict[str, dict[tuple[Any, Any], dict[str, Any]]] = {}
    base: dict[str, dict[str, Any]] = {}
    for c in results["conditions"]:
        if c["mode"] == "base":
            base[c["split"]] = c["metrics"]
        elif c["mode"] == "vfd":
            by_split.setdefault(c["split"], {})[(str(c["k"]), c["threshold"])] = c["metrics"]
    rows = []
    for key in sorted(set(by_split.get("calibration", {})) & set(by_split.get("test", {}))):
        row: dict[str, Any] = {"k": key[0], "threshold": key[1]}
        for split in ("calibration", "test"):
            row[split] = effect(by_split[split][key], base[split], budget)
        rows.append(row)
    return rows


def write_report(results: dict[str, Any], out: Path, command: str) -> str:
    """Write ``out`` (.md), ``out.with_suffix('.json')`` and the PNGs; returns the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = results["plan"]
    chosen = results["chosen_thresholds"]
    conds = results["conditions"]
    head = summary(results)
    results["summary"] = head
    base_ppl = {c["split"]: c["metrics"]["perplexity"]["value"] for c in conds if c["mode"] == "base"}
    pngs = plot(results, out)
    md = ["# Evaluation: value steering of SmolLM2-135M-Instruct (negative sentiment)\n",
          f"Reproduce: `{command}` ({results['wall_s'] / 60:.1f} min on this machine). Every number below is "
          "printed by that command and stored in "
          f"`{out.with_suffix('.json').name}`.\n",
          f"- Model: `{os.path.basename(str(results['model']).rstrip('/'))}` fp32 through vLLM (CPU), "
          f"sampling temperature {TEMPERATURE:g}, top-p {TOP_P:g}, at most {plan['max_tokens']} new tokens, one "
          "response per prompt.",
          "- Judge: VADER compound < -0.05 is undesirable. Prompts: held-out topics (calibration "
          f"{plan['n_cal']}, test {plan['n_test']} prompts).",
          f"- Head: `{os.path.basename(results['head'])}`; sidecar (conformal) threshold "
          f"{results['head_threshold']:.4f}, used for abstention.",
          f"- Threshold per K chosen on the calibration split only: lowest undesirable rate with perplexity at "
          f"most {100 * plan['max_ppl_increase']:.0f}% above base; when no threshold meets that budget, the "
          "lowest-perplexity one. Chosen: "
          + ", ".join(f"K={k}: {t:g}" + ("" if head[k]["within_budget_on_calibration"] else
                                         " (no threshold met the budget on calibration)")
                      for k, t in chosen.items()) + ".",
          "- Intervals are 95%: Wilson for rates, bootstrap over prompts for perplexity and intervention rate, "
          "jackknife for distinct-2, normal for length. tok/s is one batched measurement "
          f"({MAX_NUM_SEQS} concurrent requests, 2 CPU cores).\n",
          "## Headline (test split)\n",
          "| K | threshold | base undesirable | VFD undesirable | relative cut | perplexity change | target met |",
          "|---:|---:|---:|---:|---:|---:|---|"]
    for k, s in head.items():
        md.append(f"| {k} | {s['threshold']:g} | {s['base_undesirable']:.3f} | {s['undesirable']:.3f} | "
                  f"{100 * s['relative_cut']:.1f}% | {100 * s['perplexity_increase']:+.1f}% | "
                  f"{'yes' if s['meets_target'] else 'no'} |")
    md.append(f"\nTarget: at least a {100 * TARGET_RELATIVE_CUT:.0f}% relative cut at no more than "
              f"+{100 * TARGET_MAX_PPL_INCREASE:.0f}% perplexity.\n")
    transfer = threshold_transfer(results)
    results["threshold_transfer"] = transfer
    if transfer:
        md += ["## Threshold transfer (calibration -> test)\n",
               "Each threshold run on both splits, against its own split's base. The rule sees only the "
               "calibration columns.\n",
               "| K | threshold | cal cut | cal perplexity | test cut | test perplexity | target met on test |",
               "|---:|---:|---:|---:|---:|---:|---|"]
        for r in transfer:
            c, t = r["calibration"], r["test"]
            md.append(f"| {r['k']} | {r['threshold']:g} | {100 * c['relative_cut']:.1f}% | "
                      f"{100 * c['perplexity_increase']:+.1f}% | {100 * t['relative_cut']:.1f}% | "
                      f"{100 * t['perplexity_increase']:+.1f}% | {'yes' if t['meets_target'] else 'no'} |")
        missed = [r for r in transfer if r["test"]["meets_target"] and not r["calibration"]["within_budget"]]
        if missed and not any(s["meets_target"] for s in head.values()):
            many = len(missed) > 1
            names = ", ".join(f"K={r['k']} t={r['threshold']:g}" for r in missed)
            costs = ", ".join(f"{100 * r['calibration']['perplexity_increase']:+.1f}%" for r in missed)
            md.append(f"\nThe target is met on test by {names}, but on calibration "
                      f"{'those thresholds were' if many else 'it was'} over the perplexity budget ({costs}), "
                      f"with calibration base perplexity {base_ppl['calibration']:.2f} against "
                      f"{base_ppl['test']:.2f} on test. The rule, which sees calibration only, could not pick "
                      f"{'them' if many else 'it'}.")
        md.append("")
    for split in ("test", "calibration"):
        md.append(f"## {split.capitalize()} split\n")
        md += _table([c for c in conds if c["split"] == split], chosen)
        md.append("")
    md.append("## Plots\n")
    md += [f"![{name}]({name})" for name in pngs]
    md.append("\n## Examples (test split, first prompts)\n")
    test = [c for c in conds if c["split"] == "test"]
    for i in range(min(plan["n_examples"], len(test[0]["examples"]))):
        md.append(f"**Prompt {test[0]['examples'][i]['prompt_id']}**\n")
        for c in test:
            if c["mode"] == "vfd" and chosen.get(str(c["k"])) != c["threshold"]:
                continue
            ex = c["examples"][i]
            text = ex["text"].replace("\n", " ").strip()
            md.append(f"- {c['name']} ({'negative' if ex['negative'] else 'not negative'}): {text}")
        md.append("")
    text = "\n".join(md) + "\n"
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    return text
