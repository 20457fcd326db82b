"""value_steer.offline.evaluate: the plan, the statistics and selection rule on synthetic responses, the
report and its re-render, and ``value-steer eval --quick`` end to end (real SmolLM2, committed head, vLLM CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from value_steer.offline.evaluate import main
from value_steer.offline.evaluate.plan import EvalPlan
from value_steer.offline.evaluate.report import summary, threshold_transfer, write_report
from value_steer.offline.evaluate.stats import (
    Response,
    choose_threshold,
    condition_metrics,
    distinct_2,
    perplexity,
    wilson_interval,
)


def _r(text="a b c", lps=(-1.0, -2.0), neg=False, scored=2, interv=0, forced=False, pid="p"):
    return Response(pid, text, list(lps), neg, scored, interv, forced)


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_distinct_2_counts_word_bigrams_over_the_corpus():
    assert distinct_2(["a b a b"]) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_2(["a b", "a b"]) == pytest.approx(1 / 2)
    assert math.isnan(distinct_2(["one", ""]))


def test_perplexity_is_exp_mean_nll_over_all_tokens():
    rs = [_r(lps=(-1.0, -3.0)), _r(lps=(-2.0,))]
    assert perplexity(rs) == pytest.approx(math.exp(2.0))


def test_condition_metrics_values_and_intervals():
    rs = [_r(neg=i < 3, interv=i % 2, text=f"w{i} x{i} y", pid=str(i)) for i in range(10)]
    m = condition_metrics(rs, wall_s=2.0, n_boot=200, seed=0)
    assert m["n"] == 10 and m["tokens"] == 20 and m["tok_per_s"] == pytest.approx(10.0)
    assert m["undesirable"]["value"] == pytest.approx(0.3) and m["undesirable"]["k"] == 3
    lo, hi = m["undesirable"]["ci"]
    assert lo < 0.3 < hi
    assert m["intervention"]["value"] == pytest.approx(5 / 20)
    assert m["perplexity"]["value"] == pytest.approx(math.exp(1.5))
    for key in ("perplexity", "distinct_2", "intervention"):
        lo, hi = m[key]["ci"]
        assert lo <= m[key]["value"] <= hi, key
    assert m["length"]["ci"] == pytest.approx((2.0, 2.0))


def _metrics(undesirable, ppl):
    return {"undesirable": {"value": undesirable}, "perplexity": {"value": ppl}}


def test_choose_threshold_respects_the_perplexity_budget():
    base = _metrics(0.5, 10.0)
    sweep = {0.3: _metrics(0.1, 12.0), 0.5: _metrics(0.2, 10.9), 0.7: _metrics(0.2, 10.2)}
    # 0.3 breaks +10%; 0.5 and 0.7 tie on the rate: the one that intervenes less (higher) wins.
    assert choose_threshold(sweep, base, 0.10) == 0.7
    assert choose_threshold(sweep, base, 0.25) == 0.3
    # Nothing qualifies: the lowest perplexity.
    assert choose_threshold({0.3: _metrics(0.1, 20.0), 0.5: _metrics(0.2, 15.0)}, base, 0.10) == 0.5


def test_plan_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="thresholds"):
        EvalPlan(n_cal=1, n_test=1, max_tokens=1, ks=(4,), thresholds=(1.5,))
    with pytest.raises(ValueError, match="n_test"):
        EvalPlan(n_cal=1, n_test=0, max_tokens=1, ks=(4,), thresholds=(0.5,))
    with pytest.raises(ValueError, match=r"ks must be integers in \[1, 64\]"):  # the config's K limit
        EvalPlan(n_cal=1, n_test=1, max_tokens=1, ks=(65,), thresholds=(0.5,))


def test_report_from_synthetic_results(tmp_path):
    def cond(split, mode, k=None, t=None, neg=0.5, ppl=-1.0):
        rs = [_r(neg=i < int(10 * neg), lps=(ppl, ppl), text=f"t{i} u{i} v", pid=str(i)) for i in range(10)]
        name = "base" if mode == "base" else f"vfd K={k} t={t:g}"
        return {"name": name, "split": split, "mode": mode, "k": k, "threshold": t,
                "metrics": condition_metrics(rs, 1.0, 100, 0),
                "examples": [{"prompt_id": "p0", "text": "hello there", "negative": False}]}

    conds = [cond("calibration", "base"), cond("calibration", "vfd", 4, 0.5, 0.2, -1.05),
             cond("test", "base"), cond("test", "vfd", 4, 0.5, 0.2, -1.05)]
    results = {"plan": {"n_cal": 10, "n_test": 10, "max_tokens": 2, "ks": [4], "thresholds": [0.5],
                        "max_ppl_increase": 0.1, "n_examples": 1},
               "model": "/x/SmolLM2", "head": "/x/head.safetensors", "head_threshold": 0.77,
               "chosen_thresholds": {"4": 0.5}, "conditions": conds,
               "trajectories": {"base": {"p0": [0.4, 0.6]}}, "wall_s": 60.0}
    md = write_report(results, tmp_path / "report.md", "value-steer eval --x")
    assert (tmp_path / "report.md").read_text() == md
    for png in ("report-undesirable.png", "report-perplexity.png", "report-trajectories.png"):
        assert (tmp_path / png).stat().st_size > 1000
    head = summary(results)["4"]
    assert head["relative_cut"] == pytest.approx(0.6)
    assert head["perplexity_increase"] == pytest.approx(math.exp(0.05) - 1)
    assert head["meets_target"] is True
    assert "| 4 | 0.5 | 0.500 | 0.200 | 60.0% | +5.1% | yes |" in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["summary"]["4"]["relative_cut"] == pytest.approx(0.6)
    assert saved["summary"]["4"]["within_budget_on_calibration"] is True

    # --render-only rebuilds the same report from the JSON.
    saved["command"] = "value-steer eval --x"
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    assert main(["--render-only", str(tmp_path / "saved.json"), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == md.replace("report-", "again-").replace("report.json",
                                                                                            "again.json")


def _cond(split, mode, k=None, t=None, undesirable=0.5, ppl=5.0):
    name = "base" if mode == "base" else f"vfd K={k} t={t:g}"
    return {"name": name, "split": split, "mode": mode, "k": k, "threshold": t,
            "metrics": {"undesirable": {"value": undesirable}, "perplexity": {"value": ppl}}}


def test_threshold_transfer_compares_each_threshold_on_both_splits():
    # t=0.5 is over budget on calibration (+20%) but meets the target on test (-60% at +4%).
    conds = [_cond("calibration", "base", ppl=5.0), _cond("calibration", "vfd", 4, 0.5, 0.2, 6.0),
             _cond("calibration", "vfd", 4, 0.7, 0.4, 5.2), _cond("test", "base", ppl=5.0),
             _cond("test", "vfd", 4, 0.5, 0.2, 5.2), _cond("test", "vfd", 4, 0.7, 0.45, 5.1),
             _cond("test", "vfd", 8, 0.7, 0.45, 5.1)]  # K=8 ran on test only: no row
    rows = threshold_transfer({"plan": {"max_ppl_increase": 0.1}, "conditions": conds})
    assert [(r["k"], r["threshold"]) for r in rows] == [("4", 0.5), ("4", 0.7)]
    r = rows[0]
    assert r["calibration"]["relative_cut"] == pytest.approx(0.6)
    assert r["calibration"]["perplexity_increase"] == pytest.approx(0.2)
    assert r["calibration"]["within_budget"] is False and r["test"]["meets_target"] is True
    assert rows[1]["test"]["meets_target"] is False  # a 10% cut


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_quick_end_to_end(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "evaluation.md"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}
    proc = subprocess.run([sys.executable, "-m", "value_steer.offline.cli", "eval", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = out.read_text()
    assert md in proc.stdout  # the report is what the command prints
    results = json.loads(out.with_suffix(".json").read_text())
    names = {(c["split"], c["name"]) for c in results["conditions"]}
    assert ("test", "base") in names and ("calibration", "base") in names
    assert any(c["mode"] == "abstain" for c in results["conditions"])
    assert any(c["mode"] == "vfd" and c["split"] == "test" for c in results["conditions"])
    for c in results["conditions"]:
        m = c["metrics"]
        assert m["n"] == 8 and m["tokens"] > 0
        assert f"{m['undesirable']['value']:.3f} [" in md
        if c["mode"] == "vfd":
            assert m["intervention"]["scored"] == m["tokens"]  # every committed token was scored
    assert results["trajectories"]["base"] and len(results["trajectories"]) == 2
    for png in ("undesirable", "perplexity", "trajectories"):
        assert (tmp_path / f"evaluation-{png}.png").exists()
