"""The report's PNGs: undesirable rate and perplexity against the VFD threshold, and the value
trajectories of the example prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _save(fig: Any, ax: Any, xlabel: str, ylabel: str, legend_size: int, path: Path) -> str:
    """Label, legend and grid ``ax``, write ``fig`` to ``path`` (110 dpi) and close it; returns the file name."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """The PNGs beside ``out`` (``<stem>-undesirable.png``, ``-perplexity.png`` and, when the results have
    trajectories, ``-trajectories.png``); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = out.stem
    names = []
    conds = results["conditions"]
    for metric, label, fname in (("undesirable", "undesirable rate (VADER negative)", "undesirable"),
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
    traj = results.get("trajectories") or {}
    if traj:
        fig, ax = plt.subplots(figsize=(6, 4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for (cond, per_prompt), ls in zip(sorted(traj.items()), ("-", "--", ":")):
            for i, (pid, vals) in enumerate(sorted(per_prompt.items())):
                ax.plot(range(len(vals)), vals, ls, color=colors[i % len(colors)], lw=1.2,
                        label=f"{cond} · {pid}")
        k0 = str(results["plan"]["ks"][0])
        ax.axhline(results["chosen_thresholds"][k0], color="black", lw=0.8, label="chosen threshold")
        ax.set_ylim(0, 1)
        names.append(_save(fig, ax, "generated token", "value head P(undesirable)", 6,
                           out.parent / f"{stem}-trajectories.png"))
    return names
