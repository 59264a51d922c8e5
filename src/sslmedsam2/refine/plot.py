"""One PNG per run: how much the pseudo-labels still change per round and, with held-out labels, their Dice."""

from __future__ import annotations

from pathlib import Path

from sslmedsam2.atomic import atomic_path


def plot_rounds(rounds: list[dict], target: Path, convergence: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(matplotlib.rcParamsDefault):  # nnU-Net's plotting restyles matplotlib globally
        _draw(plt, rounds, target, convergence)


def _draw(plt, rounds: list[dict], target: Path, convergence: float) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    xs = [r["round"] for r in rounds if r.get("mean_dice_change") is not None]
    ax.plot(xs, [r["mean_dice_change"] for r in rounds if r.get("mean_dice_change") is not None], "o-",
            label="Dice, new vs previous pseudo-labels")
    held = [(r["round"], r["heldout_dice"]) for r in rounds if r.get("heldout_dice") is not None]
    if held:
        ax.plot(*zip(*held), "s--", label="Dice vs held-out labels")
    ax.axhline(convergence, color="grey", lw=0.8, ls=":", label=f"convergence ({convergence})")
    ax.set_xlabel("round")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("sslmedsam2 refine", fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(target)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
