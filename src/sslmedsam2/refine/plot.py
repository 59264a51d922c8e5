"""A refine run's pictures: WS/refine/progress.png (per label, how much the pseudo-labels still change between
rounds and, with held-out labels, their Dice; the last round per case) and one overview per case and round."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from sslmedsam2.atomic import atomic_path
from sslmedsam2.study.workspace import Workspace

MAX_CASES = 15  # cases in the per-case panel, least agreeing first
NO_HELDOUT = ("No held-out labels, so no Dice against truth.\nTo score every round, add cases with their label as "
              "held-out:\n  sslmedsam2 workspace add WS --image IMG --eval-label GT\n  sslmedsam2 workspace import WS "
              "DIR --labels-as eval")


def plot_rounds(rounds: list[dict], target: Path, convergence: float, status: dict | None = None) -> None:
    """Write the progress plot (atomic). `status`: the job's status, for the note drawn when no round has
    finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(matplotlib.rcParamsDefault):  # nnU-Net's plotting restyles matplotlib globally
        fig = _no_round(plt, status or {}) if not rounds else _draw(plt, sorted(rounds, key=lambda r: r["round"]),
                                                                    convergence)
        fig.tight_layout()
        from sslmedsam2 import __version__

        with atomic_path(Path(target)) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": f"sslmedsam2 {__version__}"})
        plt.close(fig)


def _no_round(plt, status: dict):
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.axis("off")
    state = status.get("state", "not started")
    where = (f" (round {status['round']}, {status.get('stage')})" if status.get("round") is not None else "")
    message = status.get("message") or ""
    lines = [f"No refinement round has finished yet: the job is {state}{where}."]
    if message:
        lines += textwrap.wrap(message[0].upper() + message[1:] + ("" if message.endswith(".") else "."), 90)
    if state in ("cancelled", "failed") and "resume" not in message:
        lines.append("Run the same `sslmedsam2 refine WS` command again to resume.")
    ax.text(0.02, 0.5, "\n".join(lines), fontsize=10, va="center", ha="left")
    ax.set_title("sslmedsam2 refine", fontsize=10)
    return fig


def _series(rounds: list[dict], key: str, mean_key: str) -> tuple[list[int], dict[str, list[float]], list[float]]:
    """Rounds, {label: [value per round]} (NaN where a round lacks it) and the mean per round."""
    xs = [r["round"] for r in rounds]
    names = sorted({name for r in rounds for name in (r.get(key) or {})})
    per_label = {n: [(r.get(key) or {}).get(n, math.nan) for r in rounds] for n in names}
    means = [r.get(mean_key) if r.get(mean_key) is not None else math.nan for r in rounds]
    return xs, per_label, means


def _lines(ax, xs, per_label, means, mean_label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for name, ys in per_label.items():
        ax.plot(xs, ys, "o-", lw=1.2, ms=4, label=name)
    ax.plot(xs, means, "s--", color="black", lw=1.4, ms=4, label=mean_label)
    if len(set(xs)) <= 8:
        ax.set_xticks(sorted(set(xs)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)


def _draw(plt, rounds: list[dict], convergence: float):
    fig, (change, held, cases) = plt.subplots(1, 3, figsize=(14, 4.0), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    xs, per_label, means = _series(rounds, "label_change", "mean_dice_change")
    if all(math.isnan(m) for m in means):
        change.axis("off")
        change.text(0.02, 0.5, "No previous pseudo-labels to compare with\n(the cases without ground truth had "
                    "none before round 0).", fontsize=8.5, va="center")
    else:
        _lines(change, xs, per_label, means, "mean")
        change.axhline(convergence, color="grey", lw=0.8, ls=":", label=f"convergence ({convergence})")
        change.legend(fontsize=7, loc="best")
    change.set_title("agreement of new and previous pseudo-labels", fontsize=9)
    hx, held_labels, held_means = _series(rounds, "label_heldout", "heldout_dice")
    if all(math.isnan(m) for m in held_means):
        held.axis("off")
        held.text(0.0, 0.5, NO_HELDOUT, fontsize=8, va="center", family="monospace")
    else:
        _lines(held, hx, held_labels, held_means, "mean")
        held.legend(fontsize=7, loc="best")
    held.set_title("Dice against held-out labels", fontsize=9)
    _per_case(cases, rounds[-1])
    fig.suptitle(f"sslmedsam2 refine: {len(rounds)} round{'s' if len(rounds) != 1 else ''} finished", fontsize=10)
    return fig


def _per_case(ax, last: dict) -> None:
    import numpy as np

    change, held = last.get("dice_change") or {}, last.get("heldout") or {}
    names = sorted(set(change) | set(held), key=lambda c: (change.get(c, held.get(c, 1.0)), c))
    if not names:
        ax.axis("off")
        ax.text(0.02, 0.5, "no case scored in the last round", fontsize=8.5, va="center")
        return
    shown = names[:MAX_CASES]
    y = np.arange(len(shown))
    height = 0.4 if held else 0.8
    if change:
        ax.barh(y - (height / 2 if held else 0), [change.get(c, np.nan) for c in shown], height,
                label="vs previous pseudo-label", color="tab:blue")
    if held:
        ax.barh(y + (height / 2 if change else 0), [held.get(c, np.nan) for c in shown], height,
                label="vs held-out label", color="tab:green")
    ax.set_yticks(y, shown, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("Dice")
    ax.legend(fontsize=7, loc="lower left")
    more = f" ({len(shown)} of {len(names)}, least agreeing first)" if len(names) > len(shown) else ""
    ax.set_title(f"round {last['round']} per case{more}", fontsize=9)


def draw_case_overview(ws: Workspace, case_id: str, pseudo: Path, outline: Path | None, outline_name: str,
                       round_: int, result: dict, target: Path) -> None:
    """One case after a round: its new pseudo-label in colour over slices across the structure, `outline` (the
    held-out label, or the previous pseudo-label) in white."""
    import SimpleITK as sitk

    from sslmedsam2.labelmap.pictures import draw_overview

    scores = []
    if case_id in (result.get("dice_change") or {}):
        scores.append(f"Dice vs previous {result['dice_change'][case_id]:.3f}")
    if case_id in (result.get("heldout") or {}):
        scores.append(f"vs held-out {result['heldout'][case_id]:.3f}")
    title = (f"case {case_id}, round {round_}: new pseudo-label in colour"
             + (f", {outline_name} outlined in white" if outline is not None else "")
             + (f"\n{', '.join(scores)}" if scores else ""))
    image = sitk.ReadImage(str(ws.file(case_id, "image")))
    draw_overview(image, sitk.ReadImage(str(pseudo)), None if outline is None else sitk.ReadImage(str(outline)),
                  target, title, ws.axis, legend={v: n for n, v in ws.labels.items()},
                  ct=ws.channel.upper() == "CT")
