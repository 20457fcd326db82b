"""The markdown report and JSON of a finished run: the headline against the target, the moonshot line, the
calibration sweep and its choice, threshold transfer between the splits, the test table with every method,
plots and examples. Renders older result files too (fields a run did not record show as "—")."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from value_steer.offline.assets import TEMPERATURE, TOP_P
from value_steer.offline.evaluate.plan import MAX_NUM_SEQS
from value_steer.offline.evaluate.plots import plot
from value_steer.offline.evaluate.steering import PROBE, VECTOR

# The target for VFD on test: at least this relative cut at no more than this perplexity increase.
TARGET_RELATIVE_CUT = 0.5
TARGET_MAX_PPL_INCREASE = 0.10
# The moonshot: any method on test.
MOONSHOT_RELATIVE_CUT = 0.75
MOONSHOT_MAX_PPL_INCREASE = 0.05

# How each mode is named in the method column, in report order.
METHODS = {"base": "base", "vfd": "VFD", "abstain": "abstention", "add": "activation add", "cap": "activation cap",
           "ablate": "activation ablate", "gated_add": "gated add", "vfd_gated_add": "VFD + gated add",
           "logit": "logit steering", "token": "token VFD", "token_tilt": "token VFD (tilt)"}
# Modes whose sampled logprobs are the unsteered model's (the rescoring check runs on them).
UNSTEERED_MODES = ("base", "vfd", "abstain")


def _fmt(m: dict[str, Any] | None, digits: int = 3) -> str:
    if not m:
        return "—"
    v, (lo, hi) = m["value"], m["ci"]
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _pct(x: float, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{100 * x:+.1f}%" if sign else f"{100 * x:.1f}%"


def _is_chosen(c: dict[str, Any], chosen: dict[str, float]) -> bool:
    """A VFD row at its K's chosen threshold, or a token-mode row at the token sweep's (``chosen["token"]``)."""
    if c["mode"] == "token":
        return chosen.get("token") == c["threshold"]
    if c["mode"] == "token_tilt":
        return chosen.get("token_tilt") == c["scale"]
    return c["mode"] == "vfd" and chosen.get(str(c["k"])) == c["threshold"]


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


def effect(m: dict[str, Any], base: dict[str, Any], budget: float) -> dict[str, Any]:
    """One condition's metrics ``m`` against its split's ``base``: relative cut of the undesirable rate,
    perplexity increase, whether it is within the selection ``budget``, and whether it meets the target and
    the moonshot."""
    b, v = base["undesirable"]["value"], m["undesirable"]["value"]
    cut = (b - v) / b if b > 0 else float("nan")
    inc = m["perplexity"]["value"] / base["perplexity"]["value"] - 1.0
    return {"relative_cut": cut, "perplexity_increase": inc, "within_budget": bool(inc <= budget),
            "meets_target": bool(cut >= TARGET_RELATIVE_CUT and inc <= TARGET_MAX_PPL_INCREASE),
            "moonshot": bool(cut >= MOONSHOT_RELATIVE_CUT and inc <= MOONSHOT_MAX_PPL_INCREASE)}


def _base(results: dict[str, Any], split: str) -> dict[str, Any]:
    return next(c for c in results["conditions"] if c["split"] == split and c["mode"] == "base")["metrics"]


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline: per K, the chosen threshold's relative cut and perplexity change on test."""
    test = [c for c in results["conditions"] if c["split"] == "test"]
    base = _base(results, "test")
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


def effects_on_test(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-base test condition against the test base (name, mode and :func:`effect`)."""
    base = _base(results, "test")
    budget = results["plan"]["max_ppl_increase"]
    return [{"name": c["name"], "mode": c["mode"], **effect(c["metrics"], base, budget)}
            for c in results["conditions"] if c["split"] == "test" and c["mode"] != "base"]


def moonshot(results: dict[str, Any]) -> dict[str, Any]:
    """Whether any method's test row reaches the moonshot, and the best relative cut within its perplexity
    limit (descriptive: a maximum over the test rows, not an operating point chosen before looking)."""
    rows = effects_on_test(results)
    met = [r["name"] for r in rows if r["moonshot"]]
    ok = [r for r in rows if r["perplexity_increase"] <= MOONSHOT_MAX_PPL_INCREASE and math.isfinite(r["relative_cut"])]
    best = max(ok, key=lambda r: r["relative_cut"]) if ok else None
    return {"met_by": met, "best_within_ppl": None if best is None else
            {"name": best["name"], "relative_cut": best["relative_cut"],
             "perplexity_increase": best["perplexity_increase"]}}


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


def rescoring_check(results: dict[str, Any]) -> dict[str, Any] | None:
    """On the unsteered rows (base, VFD, abstention), the largest relative difference between the rescored
    perplexity and the one of the engine's own sampled logprobs (the same model, so float noise); None for
    runs that did not record both."""
    diffs = [(c["split"], c["name"], c["metrics"]["perplexity_sampled"] / c["metrics"]["perplexity"]["value"] - 1.0)
             for c in results["conditions"]
             if c["mode"] in UNSTEERED_MODES and math.isfinite(c["metrics"].get("perplexity_sampled", math.nan))]
    if not diffs:
        return None
    worst = max(diffs, key=lambda d: abs(d[2]))
    return {"rows": len(diffs), "max_abs_relative_diff": abs(worst[2]), "worst": f"{worst[0]} {worst[1]}"}


def gate_check(results: dict[str, Any]) -> dict[str, Any] | None:
    """The example prompts of the gated rows: open decode tokens by the worker's count and by the gates
    replayed from the rescoring pass's capture (they agree when the capture reads what the gate read)."""
    gates = results.get("gate_trajectories") or {}
    worker = replay = tokens = replay_tokens = 0
    for c in results["conditions"]:
        traj = gates.get(c["name"])
        if not traj:
            continue
        for ex in c["examples"]:
            g = traj.get(ex["prompt_id"])
            if g is None:
                continue
            worker += int(ex.get("gate_open", 0))
            tokens += int(ex.get("gate_tokens", 0))
            replay += sum(x >= 0.5 for x in g)
            replay_tokens += len(g)
    if not replay_tokens:
        return None
    return {"worker_open": worker, "worker_tokens": tokens, "replay_open": replay, "replay_tokens": replay_tokens}


def _table(conds: list[dict[str, Any]], chosen: dict[str, float], base: dict[str, Any], budget: float,
           mark_budget: bool = False) -> list[str]:
    lines = ["| method | condition | n | undesirable | relative cut | perplexity | perplexity change | length (tokens) "
             "| distinct-2 | intervention rate¹ | gate open² | tok/s³ |",
             "|---|---|---:|---|---:|---|---:|---|---|---|---|---:|"]
    for c in conds:
        m = c["metrics"]
        name = f"**{c['name']}** (chosen)" if _is_chosen(c, chosen) else c["name"]
        if c["mode"] == "base":
            cut, inc = "—", "—"
        else:
            e = effect(m, base, budget)
            cut, inc = _pct(e["relative_cut"]), _pct(e["perplexity_increase"], sign=True)
            if mark_budget and not e["within_budget"]:
                inc += " (over)"
        lines.append(f"| {METHODS.get(c['mode'], c['mode'])} | {name} | {m['n']} | {_fmt(m['undesirable'])} | {cut} | "
                     f"{_fmt(m['perplexity'], 2)} | {inc} | {_fmt(m['length'], 1)} | {_fmt(m['distinct_2'])} | "
                     f"{_fmt(m['intervention'])} | {_fmt(m.get('gate_open'))} | {m['tok_per_s']:.1f} |")
    return lines


FOOTNOTES = [
    "¹ Intervention rate, per method: VFD, tokens where the natural sample was replaced / scored tokens; "
    "abstention, forced EOS / scored tokens; gated add, decode tokens whose gate was open (>= 0.5) / decode "
    "tokens (the worker's count); ungated activation ops (add, cap, ablate) edit every token, so 1. "
    "VFD + gated add shows VFD's replacements here and its gate in the next column.",
    "² Gate open: decode tokens whose gate was >= 0.5 / decode tokens of the gated requests (the worker's count).",
    "³ tok/s: generated tokens / wall time of the condition's one batch (a single measurement, no interval; the "
    "rescoring pass is not included).",
]


def _runtime(results: dict[str, Any]) -> str:
    rt = results.get("runtime_s")
    total = f"{results['wall_s'] / 60:.1f} min on this machine"
    if not rt:
        return total
    return (total + ": generation {:.1f}, rescoring {:.1f}, engine start-up {:.1f}, other {:.1f} min".format(
        *(rt[k] / 60 for k in ("generation", "rescoring", "engine_start", "other"))))


def _shown_path(path: str) -> str:
    """``path`` relative to the source checkout when it lies inside it (the committed data), else as given: the
    report is committed, so it should not carry this machine's absolute paths. A result file written in another
    checkout (its absolute paths name that one) shows the longest trailing part that exists in this checkout, so a
    re-render gives the same report wherever the repository lives."""
    from value_steer.offline.data_dir import repo_root

    root = repo_root()
    if root is None:
        return path
    p = Path(path)
    try:
        return str(p.resolve().relative_to(root))
    except ValueError:
        pass
    if p.is_absolute():
        parts = p.parts[1:]
        for i in range(len(parts)):
            if (root / Path(*parts[i:])).exists():
                return str(Path(*parts[i:]))
    return path


def _pairs_vector_line(v: dict[str, Any], name: str) -> str:
    """The activation-steering line of a vector made from contrastive pairs (no probe, no cap floor)."""
    meta = v["meta"][name]
    norm = meta["norms"][str(v["layer"])]
    r = v.get("worker_residual_norm")
    rel = (f"; the layer's typical residual norm, as the worker measured it, is {r:.1f}, so scale c adds "
           f"{norm / r:.2f}c of it" if r else "")
    return (f"- Activation steering: vector `{name}` from `{_shown_path(v['dir'])}` at layer {v['layer']}, made by "
            f"{meta.get('made_by', 'value-steer vectors --pairs')} from {meta.get('pairs', {}).get('n', '?')} pairs "
            f"(|d| {norm:.3g} as written{rel}). Add scales multiply the vector as written: "
            f"{', '.join(f'{s:g}' for s in v['scales'])}. Ungated ops edit every token (prompt and decode); ablate "
            "removes the whole component along the direction. A pairs vector has no cap floor and no gate probe "
            "(`value-steer vectors --task` measures both on judged samples), so the cap and gated rows are not run.")


def _vectors_lines(results: dict[str, Any]) -> list[str]:
    v = results.get("vectors")
    if not v:
        return []
    name, probe = v.get("name", VECTOR), v.get("probe", PROBE)
    if not v.get("unit", True):
        return [_pairs_vector_line(v, name)]
    lines = [f"- Activation steering: vectors from `{_shown_path(v['dir'])}`: `{name}` at layer {v['layer']} "
             "(unit norm; "
             f"mean residual-stream norm there {v['residual_norm']:.1f}; suggested add scales "
             f"{', '.join(f'{s:g}' for s in v['scales'])}; cap floor {v['cap_min']:.3g} on the projection), gate "
             f"probe `{probe}` at layer {v['probe_layer']} (threshold {v['probe_threshold']:.3f}, sharpness "
             f"{v['probe_sharpness']:g}). Ungated ops edit every token (prompt and decode); ablate removes the "
             "whole component along the direction, the positive side with the negative. Gated add: scale "
             f"{v['gated_scale']:g}, fixed before the run (the largest suggested scale unless `--gated-scale` set "
             f"it), at layer {v['add_layer']}"
             + (" (the vector's own layer)." if v["add_layer"] == v["layer"] else
                f" (the gate's: the vector's layer {v['layer']} is below the gate layer, where an op is not gated).")]
    g = gate_check(results)
    if g:
        lines.append("- Gate trajectories replayed from an unsteered capture at the gate layer (every gated op sits "
                     "at or above it, and the gate reads that layer's stream before its edits): on the example "
                     f"prompts {g['replay_open']} of {g['replay_tokens']} decode tokens open, against the worker's "
                     f"{g['worker_open']} of {g['worker_tokens']}.")
    return lines


def _token_headline(results: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """The token-mode lines of the headline: each calibration-chosen point (mask threshold, tilt beta) on test, with
    its speed against base and the chosen exact VFD point (tok/s of the same batch shape)."""
    test = [c for c in results["conditions"] if c["split"] == "test"]
    k0 = str(results["plan"]["ks"][0])
    vfd = next(c for c in test if c["mode"] == "vfd" and str(c["k"]) == k0
               and c["threshold"] == results["chosen_thresholds"][k0])["metrics"]
    base_tps = next(c for c in test if c["mode"] == "base")["metrics"]["tok_per_s"]
    out = []
    token_k = int(results["plan"].get("token_k", 0))
    rule = f"the K-candidate rule (K={token_k}) at threshold" if token_k else "mask at threshold"
    for mode, key, field, what in (("token", "chosen_token_threshold", "threshold", rule),
                                   ("token_tilt", "chosen_token_beta", "scale", "tilt at beta")):
        point = results.get(key)
        if point is None:
            continue
        tok = next(c for c in test if c["mode"] == mode and c[field] == point)["metrics"]
        e = effect(tok, base, results["plan"]["max_ppl_increase"])
        out.append(f"\nToken mode (Q-head `{os.path.basename(str(results.get('qhead')))}`), {what} {point:g} chosen "
                   f"on calibration by the same rule: undesirable {tok['undesirable']['value']:.3f} against base "
                   f"{base['undesirable']['value']:.3f}, a {_pct(e['relative_cut'])} cut at "
                   f"{_pct(e['perplexity_increase'], sign=True)} perplexity (target "
                   f"{'met' if e['meets_target'] else 'not met'}); {tok['tok_per_s']:.0f} tok/s against base's "
                   f"{base_tps:.0f} and exact VFD K={k0}'s {vfd['tok_per_s']:.0f} (one batch each).")
    return out


def write_report(results: dict[str, Any], out: Path, command: str) -> str:
    """Write ``out`` (.md), ``out.with_suffix('.json')`` and the PNGs; returns the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = results["plan"]
    budget = plan["max_ppl_increase"]
    chosen = results["chosen_thresholds"]
    # The rows marked "(chosen)": each K's VFD threshold and, with token-mode rows, the token sweep's.
    marked = {**chosen, **({"token": results["chosen_token_threshold"]} if "chosen_token_threshold" in results else {}),
              **({"token_tilt": results["chosen_token_beta"]} if "chosen_token_beta" in results else {})}
    conds = results["conditions"]
    head = summary(results)
    results["summary"] = head
    results["test_effects"] = effects_on_test(results)
    moon = results["moonshot"] = moonshot(results)
    check = results["rescoring_check"] = rescoring_check(results)
    base = {split: _base(results, split) for split in ("calibration", "test")}
    base_ppl = {s: b["perplexity"]["value"] for s, b in base.items()}
    pngs = plot(results, out)
    task = results.get("task")
    title = ("# Evaluation: value steering of SmolLM2-135M-Instruct (negative sentiment)\n" if task is None else
             f"# Evaluation: value steering of {os.path.basename(str(results['model']).rstrip('/'))} "
             f"(task {task['name']})\n")
    judge = ("- Judge: VADER compound < -0.05 is undesirable. Prompts: held-out topics (calibration "
             f"{plan['n_cal']}, test {plan['n_test']} prompts)." if task is None else
             f"- Judge: `{task['judge']}` (task `{task['name']}`, task file `{_shown_path(task['task_file'])}`, "
             f"prompts sha256 {str(task.get('prompts_sha256'))[:12]}...): undesirable as it says. Prompts: the task's "
             "calibration "
             f"({plan['n_cal']}) and test ({plan['n_test']}) splits.")
    md = [title,
          f"Reproduce: `{command}` ({_runtime(results)}). Every number below is printed by that command and stored "
          f"in `{out.with_suffix('.json').name}`.\n",
          f"- Model: `{os.path.basename(str(results['model']).rstrip('/'))}` fp32 through vLLM (CPU), "
          f"sampling temperature {TEMPERATURE:g}, top-p {TOP_P:g}, at most {plan['max_tokens']} new tokens, one "
          "response per prompt, the same per-request seeds in every condition.",
          judge,
          f"- Head: `{os.path.basename(results['head'])}`; sidecar (conformal) threshold "
          f"{results['head_threshold']:.4f}, used for abstention.",
          *_vectors_lines(results),
          f"- Threshold per K chosen on the calibration split only: lowest undesirable rate with perplexity at "
          f"most {100 * budget:.0f}% above base; when no threshold meets that budget, the "
          "lowest-perplexity one. Chosen: "
          + ", ".join(f"K={k}: {t:g}" + ("" if head[k]["within_budget_on_calibration"] else
                                         " (no threshold met the budget on calibration)")
                      for k, t in chosen.items()) + ". The test split is run once per point.",
          ]
    if check is not None:
        md.append("- Perplexity of every row is under the unsteered model: exp(mean NLL) of the response tokens "
                  "from a rescoring pass (one unsteered prefill of prompt + response with prompt logprobs), since "
                  "an activation-steered request's own logprobs are the steered model's. On the "
                  f"{check['rows']} unsteered rows (base, VFD, abstention) the engine's sampled logprobs give the "
                  + ("same perplexity exactly (bit for bit)." if check["max_abs_relative_diff"] == 0 else
                     f"same perplexity to within {100 * check['max_abs_relative_diff']:.2g}% (largest: "
                     f"{check['worst']}): float noise."))
    else:
        md.append("- Perplexity: exp(mean NLL) of the response tokens under the unsteered model (the engine's "
                  "raw logprob of each committed token).")
    md += ["- Intervals are 95%: Wilson for rates, bootstrap over prompts for perplexity, intervention and gate "
           "rates, jackknife for distinct-2, normal for length. tok/s is one batched measurement "
           f"({MAX_NUM_SEQS} concurrent requests, 2 CPU cores).\n",
           "## Headline (test split)\n",
           "| K | threshold | base undesirable | VFD undesirable | relative cut | perplexity change | target met |",
           "|---:|---:|---:|---:|---:|---:|---|"]
    for k, s in head.items():
        md.append(f"| {k} | {s['threshold']:g} | {s['base_undesirable']:.3f} | {s['undesirable']:.3f} | "
                  f"{_pct(s['relative_cut'])} | {_pct(s['perplexity_increase'], sign=True)} | "
                  f"{'yes' if s['meets_target'] else 'no'} |")
    md += _token_headline(results, base["test"])
    md.append(f"\nTarget: at least a {100 * TARGET_RELATIVE_CUT:.0f}% relative cut at no more than "
              f"+{100 * TARGET_MAX_PPL_INCREASE:.0f}% perplexity.\n")
    best = moon["best_within_ppl"]
    best_txt = ("no test row is within that perplexity" if best is None else
                f"the largest cut within +{100 * MOONSHOT_MAX_PPL_INCREASE:.0f}% perplexity is {best['name']}'s "
                f"{_pct(best['relative_cut'])} ({_pct(best['perplexity_increase'], sign=True)})")
    md.append(f"Moonshot (at least a {100 * MOONSHOT_RELATIVE_CUT:.0f}% relative cut at no more than "
              f"+{100 * MOONSHOT_MAX_PPL_INCREASE:.0f}% perplexity, any method on test): "
              + (f"**met** by {', '.join(moon['met_by'])}" if moon["met_by"] else "not met by any method")
              + f"; {best_txt}. This is read off the test table, not a point chosen beforehand.\n")

    cal = [c for c in conds if c["split"] == "calibration"]
    md += ["## Calibration sweep (the selection rule's only input)\n",
           f"Base perplexity {base_ppl['calibration']:.3f}: the budget is perplexity <= "
           f"{base_ppl['calibration'] * (1 + budget):.3f} (+{100 * budget:.0f}%); rows over it are marked "
           "\"(over)\". Chosen: " + ", ".join(f"K={k} t={t:g}" for k, t in chosen.items()) + ".\n"]
    md += _table(cal, marked, base["calibration"], budget, mark_budget=True)
    md.append("")
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
            md.append(f"| {r['k']} | {r['threshold']:g} | {_pct(c['relative_cut'])} | "
                      f"{_pct(c['perplexity_increase'], sign=True)} | {_pct(t['relative_cut'])} | "
                      f"{_pct(t['perplexity_increase'], sign=True)} | {'yes' if t['meets_target'] else 'no'} |")
        missed = [r for r in transfer if r["test"]["meets_target"] and not r["calibration"]["within_budget"]]
        if missed and not any(s["meets_target"] for s in head.values()):
            many = len(missed) > 1
            names = ", ".join(f"K={r['k']} t={r['threshold']:g}" for r in missed)
            costs = ", ".join(_pct(r["calibration"]["perplexity_increase"], sign=True) for r in missed)
            md.append(f"\nThe target is met on test by {names}, but on calibration "
                      f"{'those thresholds were' if many else 'it was'} over the perplexity budget ({costs}), "
                      f"with calibration base perplexity {base_ppl['calibration']:.2f} against "
                      f"{base_ppl['test']:.2f} on test. The rule, which sees calibration only, could not pick "
                      f"{'them' if many else 'it'}.")
        md.append("")
    test = [c for c in conds if c["split"] == "test"]
    order = list(METHODS)
    test_sorted = sorted(test, key=lambda c: order.index(c["mode"]) if c["mode"] in order else len(order))
    md += ["## Test split: every method\n",
           "Same prompts, judge, sampling, seeds and token budget for every row; relative cut and perplexity "
           "change against this split's base.\n"]
    md += _table(test_sorted, marked, base["test"], budget)
    md += ["", *FOOTNOTES, ""]
    md.append("## Plots\n")
    md += [f"![{name}]({name})" for name in pngs]
    md.append("\n## Examples (test split, first prompts)\n")
    shown = [c for c in test_sorted if c["mode"] not in ("vfd", "token", "token_tilt") or _is_chosen(c, marked)]
    for i in range(min(plan["n_examples"], len(test[0]["examples"]))):
        md.append(f"**Prompt {test[0]['examples'][i]['prompt_id']}**\n")
        for c in shown:
            ex = c["examples"][i]
            text = ex["text"].replace("\n", " ").strip()
            md.append(f"- {c['name']} ({'negative' if ex['negative'] else 'not negative'}): {text}")
        md.append("")
    text = "\n".join(md) + "\n"
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    return text
