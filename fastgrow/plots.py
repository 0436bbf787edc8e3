"""PNG plots of a run's metrics: loss vs tokens (and vs FLOPs), growth events marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(records: list[dict[str, Any]], out_png: str | Path, title: str = "fastgrow") -> Path:
    """Train (and validation, if logged) loss vs tokens and vs FLOPs; vertical lines at growth events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    grows = [r for r in records if r.get("kind") == "growth"]
    if not train:
        raise ValueError("no training records to plot")
    has_flops = all("flops" in r for r in train)
    ncols = 2 if has_flops else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    for ax, xkey, xlabel in zip(axes[0], ("tokens", "flops"), ("tokens", "training FLOPs")):
        ax.plot([r[xkey] for r in train], [r["loss"] for r in train], label="train loss", lw=1.4)
        if val and all(xkey in r for r in val):
            ax.plot([r[xkey] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", ms=4)
        for i, g in enumerate(grows):
            if xkey in g:
                label = f"growth: {g.get('op', '')} {g.get('layers_before', '')}→{g.get('layers_after', '')}"
                ax.axvline(g[xkey], color="C3", ls="--", lw=1.2, label=label if i == 0 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
