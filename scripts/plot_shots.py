"""Accuracy-vs-shots plots for ``scripts/make_table.py --plot_dir`` (needs matplotlib, which is optional)."""
from __future__ import annotations

from pathlib import Path


def draw(curves, zero_shot: float | None, title: str, path: Path) -> bool:
    """One PNG at ``path``: each ``(label, [(shots, mean, std or None), ...])`` of ``curves`` as a line with error
    bars on a log shots axis, and a dashed line at ``zero_shot`` (None: none). False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from lora_zoo.files import atomic_write
    shots = sorted({k for _, points in curves for k, _, _ in points})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, points in curves:
        ax.errorbar([k for k, _, _ in points], [mean for _, mean, _ in points], marker="o", capsize=3,
                    yerr=[std or 0.0 for _, _, std in points], label=label)
    if zero_shot is not None:
        ax.axhline(zero_shot, color="grey", linestyle="--", linewidth=1, label="zero-shot")
    ax.set(xscale="log", xlabel="shots per class", ylabel="top-1 (%)", title=title)
    ax.set_xticks(shots, labels=[str(k) for k in shots])
    ax.minorticks_off()
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True
