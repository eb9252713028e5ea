"""The report's scatter plots: students (o = KD, x = hard labels) and teachers (*) against size or speed."""

from __future__ import annotations



def scatter(ax, runs: list[dict], teachers: list[dict], xkey: str, metric: str) -> None:
    """Students (o = KD, x = hard labels) and teachers (*) at (xkey, test metric), a dashed line per baseline
    (majority class, all-`O`), and labels moved apart so that none overprints another."""
    from matplotlib.ticker import NullFormatter
    placed = []
    for r in runs + teachers:
        x, y = r.get(xkey), (r.get("test") or {}).get(metric)
        if not x or y is None:
            continue
        teacher = r in teachers
        style = {"marker": "*", "s": 220, "c": "black"} if teacher else \
            {"marker": "o" if r["kd"] else "x", "s": 60, "c": "tab:blue" if r["kd"] else "tab:orange"}
        ax.scatter(x, y, **style)
        placed.append((x, y, r["run"].split(" (")[0]))
    for t in teachers:
        base = (t.get("baseline") or {}).get("test", {}).get(metric)
        if base is not None:
            ax.axhline(base, ls="--", lw=1, c="gray")
            ax.annotate(t["baseline"]["run"], (0.01, base), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^2, 3x10^2 ... overprint on a short log axis
    ax.grid(alpha=0.3)
    label_apart(ax, placed)


def label_apart(ax, points: list[tuple[float, float, str]], step: float = 11.0) -> None:
    """Label each point, nudging a label down in `step`-point steps while its box would overlap one already
    placed (bow and bow-hard often sit on top of each other)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for x, y, name in sorted(points, key=lambda p: -p[1]):
        dy = 4.0
        while True:
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=8)
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(b) for b in boxes) or dy < -12 * step:
                boxes.append(box)
                break
            text.remove()
            dy -= step

