"""The report's PNGs: the undesirable-rate / perplexity trade-off of every method on test, undesirable rate and
perplexity against the VFD threshold, and the value and gate trajectories of the example prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Point methods of the trade-off plot: marker per mode (curves: the first K's VFD sweep and the add scales).
_MARKERS = {"base": "*", "abstain": "X", "cap": "s", "ablate": "D", "gated_add": "^", "vfd_gated_add": "P",
            "vfd": "o", "logit": "v"}


def _save(fig: Any, ax: Any, xlabel: str, ylabel: str, legend_size: int, path: Path, outside: bool = False) -> str:
    """Label, legend and grid ``ax``, write ``fig`` to ``path`` (110 dpi) and close it; returns the file name.
    ``outside``: the legend right of the axes (many entries would cover the points)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if outside:
        ax.legend(fontsize=legend_size, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _xy_err(conds: list[dict[str, Any]]) -> tuple[list[float], list[float], list[list[float]], list[list[float]]]:
    """Perplexity (x) and undesirable rate (y) of ``conds`` with their interval half-widths."""
    ms = [c["metrics"] for c in conds]
    xs = [m["perplexity"]["value"] for m in ms]
    ys = [m["undesirable"]["value"] for m in ms]
    xerr = [[x - m["perplexity"]["ci"][0] for x, m in zip(xs, ms)],
            [m["perplexity"]["ci"][1] - x for x, m in zip(xs, ms)]]
    yerr = [[y - m["undesirable"]["ci"][0] for y, m in zip(ys, ms)],
            [m["undesirable"]["ci"][1] - y for y, m in zip(ys, ms)]]
    return xs, ys, xerr, yerr


def _tradeoff(results: dict[str, Any], path: Path) -> str:
    """Test split: undesirable rate against perplexity, one curve or point set per method, the budget lines."""
    import matplotlib.pyplot as plt

    conds = [c for c in results["conditions"] if c["split"] == "test"]
    plan = results["plan"]
    k0 = plan["ks"][0]
    chosen = results["chosen_thresholds"]
    base = next(c for c in conds if c["mode"] == "base")["metrics"]
    fig, ax = plt.subplots(figsize=(9.5, 5))
    # One colour per entry (the default cycle has 10, fewer than the rows); log x: perplexities span 4-40.
    tab20 = plt.get_cmap("tab20").colors
    colors = iter((tab20[::2] + tab20[1::2]) * 2)  # the 10 strong colours first, then their light pairs
    ax.set_xscale("log")
    sweep = sorted((c for c in conds if c["mode"] == "vfd" and c["k"] == k0), key=lambda c: c["threshold"])
    if sweep:
        xs, ys, xerr, yerr = _xy_err(sweep)
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="-o", ms=4, capsize=2, lw=1.2,
                    label=f"VFD K={k0} (threshold sweep)", color=next(colors))
        for c, x, y in zip(sweep, xs, ys):
            tag = f"{c['threshold']:g}" + (" (chosen)" if chosen.get(str(k0)) == c["threshold"] else "")
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    # Curves over a method's knob (add scale, logit strength); the other rows are single points.
    curves = {"add": ("-s", "activation add (scales)", "s="), "logit": ("-v", "logit steering (strengths)", "s=")}
    for mode, (fmt, label, prefix) in curves.items():
        rows = sorted((c for c in conds if c["mode"] == mode), key=lambda c: c["scale"])
        if not rows:
            continue
        xs, ys, xerr, yerr = _xy_err(rows)
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=fmt, ms=4, capsize=2, lw=1.2, label=label,
                    color=next(colors))
        for c, x, y in zip(rows, xs, ys):
            ax.annotate(f"{prefix}{c['scale']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    points = [c for c in conds if c["mode"] not in curves and not (c["mode"] == "vfd" and c["k"] == k0)]
    for c in points:
        xs, ys, xerr, yerr = _xy_err([c])
        label = c["name"] + (" (chosen)" if c["mode"] == "vfd" and chosen.get(str(c["k"])) == c["threshold"] else "")
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=_MARKERS.get(c["mode"], "o"), ms=7 if c["mode"] == "base" else 5,
                    capsize=2, label=label, color=next(colors))
    ppl0 = base["perplexity"]["value"]
    budget = plan["max_ppl_increase"]
    ax.axvline(ppl0 * (1 + budget), color="red", lw=1, ls="--", label=f"+{100 * budget:.0f}% perplexity budget")
    ax.axvline(ppl0 * 1.05, color="red", lw=0.8, ls=":", label="+5% (moonshot)")
    u0 = base["undesirable"]["value"]
    ax.axhline(0.5 * u0, color="gray", lw=0.8, ls="--", label="50% cut (target)")
    ax.axhline(0.25 * u0, color="gray", lw=0.8, ls=":", label="75% cut (moonshot)")
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=6)
    return _save(fig, ax, "perplexity under the unsteered model (test split, log scale)",
                 _undesirable_label(results), 7, path, outside=True)


def _undesirable_label(results: dict[str, Any]) -> str:
    """The undesirable-rate axis, named by the run's judge (a user task's, else the built-in VADER one)."""
    task = results.get("task")
    return "undesirable rate (VADER negative)" if task is None else f"undesirable rate (task {task['name']})"


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """The PNGs beside ``out`` (``<stem>-tradeoff.png``, ``-undesirable.png``, ``-perplexity.png`` and, when the
    results have them, ``-trajectories.png`` and ``-gates.png``); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = out.stem
    names = [_tradeoff(results, out.parent / f"{stem}-tradeoff.png")]
    conds = results["conditions"]
    for metric, label, fname in (("undesirable", _undesirable_label(results), "undesirable"),
                                 ("perplexity", "perplexity under the unsteered model", "perplexity")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, style in (("test", "-o"), ("calibration", "--s")):
            base = next(c for c in conds if c["split"] == split and c["mode"] == "base")["metrics"][metric]
            ax.axhline(base["value"], color="gray", ls=style[:-1], lw=1, label=f"base ({split})")
            for k in results["plan"]["ks"]:
                pts = sorted((c["threshold"], c["metrics"][metric]) for c in conds
                             if c["split"] == split and c["mode"] == "vfd" and c["k"] == k)
                xs = [p[0] for p in pts]
                ys = [p[1]["value"] for p in pts]
                err = [[y - p[1]["ci"][0] for y, p in zip(ys, pts)], [p[1]["ci"][1] - y for y, p in zip(ys, pts)]]
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=f"VFD K={k} ({split})")
        names.append(_save(fig, ax, "threshold on P(undesirable)", label, 7, out.parent / f"{stem}-{fname}.png"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    traj = results.get("trajectories") or {}
    if traj:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (cond, per_prompt), ls in zip(sorted(traj.items()), ("-", "--", ":")):
            for i, (pid, vals) in enumerate(sorted(per_prompt.items())):
                ax.plot(range(len(vals)), vals, ls, color=colors[i % len(colors)], lw=1.2,
                        label=f"{cond} · {pid}")
        k0 = str(results["plan"]["ks"][0])
        ax.axhline(results["chosen_thresholds"][k0], color="black", lw=0.8, label="chosen threshold")
        ax.set_ylim(0, 1)
        names.append(_save(fig, ax, "generated token", "value head P(undesirable)", 6,
                           out.parent / f"{stem}-trajectories.png"))
    gates = {k: v for k, v in (results.get("gate_trajectories") or {}).items() if v}
    if gates:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (cond, per_prompt), ls in zip(sorted(gates.items()), ("-", "--", ":")):
            for i, (pid, vals) in enumerate(sorted(per_prompt.items())):
                ax.plot(range(len(vals)), vals, ls, color=colors[i % len(colors)], lw=1.2, label=f"{cond} · {pid}")
        ax.axhline(0.5, color="black", lw=0.8, label="open (g >= 0.5)")
        ax.set_ylim(0, 1)
        names.append(_save(fig, ax, "generated token (its residual stream steers the next one)", "gate g", 6,
                           out.parent / f"{stem}-gates.png"))
    return names
