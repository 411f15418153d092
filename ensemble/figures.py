"""The run's figures as PNG bytes (matplotlib, no display): TensorBoard and `ensemble report`
draw the same ones.

Each function takes plain numbers (what metrics.json, subsets.json and ensemble.json hold) and
returns one PNG; nothing here reads files or knows about Ray.
"""
from __future__ import annotations

import functools
import io
from collections.abc import Sequence

ANNOTATE_UP_TO = 12  # classes: above this a matrix's cells are too small to print numbers in
BOX = "\u25a1"  # drawn for a character no face has (matplotlib would warn once per character)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # slow import, and no pyplot state: safe anywhere

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


@functools.cache
def _fonts() -> tuple[list[str], frozenset[int]]:
    """Matplotlib's default face, then any installed CJK face (class names such as Han
    characters are drawn from the first face that has them); and the code points they draw."""
    from matplotlib import font_manager, rcParams

    names = [rcParams["font.sans-serif"][0],
             *sorted({f.name for f in font_manager.fontManager.ttflist if "CJK" in f.name})]
    drawn = set()
    for name in names:
        drawn.update(font_manager.get_font(font_manager.findfont(name)).get_charmap())
    return names, frozenset(drawn)


def _drawable(labels: Sequence[str]) -> list[str]:
    """Class names with what no face of `_fonts` draws as a box (matplotlib would warn once
    for each such character: a run on 1000 Han classes printed hundreds of lines)."""
    drawn = _fonts()[1]
    return ["".join(c if c.isspace() or ord(c) in drawn else BOX for c in str(label))
            for label in labels]


def _png(fig) -> bytes:
    """The figure as PNG bytes, every text in the faces of `_fonts`."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_fontfamily(_fonts()[0])
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _matrix(ax, matrix, labels: Sequence[str], cmap: str, fmt, norm=None):
    """`matrix` as an image with class ticks; cells numbered (`fmt`) when there are few."""
    import numpy as np
    from matplotlib.colors import Normalize

    values = np.asarray(matrix, dtype=float)
    norm = norm or Normalize(np.nanmin(values), np.nanmax(values))
    image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
    ticks = range(len(labels))
    ax.set_xticks(ticks, _drawable(labels), rotation=90 if len(labels) > 4 else 0)
    ax.set_yticks(ticks, _drawable(labels))
    if len(labels) <= ANNOTATE_UP_TO:
        for (i, j), v in np.ndenumerate(values):
            if fmt(v):  # light text on the dark end of the colour map
                ax.text(j, i, fmt(v), ha="center", va="center", fontsize=7,
                        color="white" if norm(v) < 0.55 else "black")
    return image


def covariance(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str) -> bytes:
    """The covariance of the generalists' predicted probabilities, class by class."""
    fig = _figure(5.5, 4.8)
    ax = fig.add_subplot()
    limit = max((abs(v) for row in matrix for v in row), default=1.0) or 1.0
    image = _matrix(ax, matrix, labels, "RdBu_r", lambda v: "", None)
    image.set_clim(-limit, limit)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def subsets(members: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Which classes each specialist covers: one row per specialist, one column per class."""
    fig = _figure(max(4.0, 0.45 * len(labels) + 1.5), 0.45 * len(members) + 1.6)
    ax = fig.add_subplot()
    grid = [[1.0 if c in set(m) else 0.0 for c in range(len(labels))] for m in members]
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.4, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(labels)), _drawable(labels), rotation=90 if len(labels) > 4 else 0)
    ax.set_yticks(range(len(members)), [f"specialist-{i}" for i in range(len(members))])
    ax.set_title("Class subsets found (no labels used)", fontsize=10)
    return _png(fig)


def confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> bytes:
    """Test confusion counts: true class by row, predicted class by column (log colour scale)."""
    from matplotlib.colors import LogNorm

    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    most = max((v for row in matrix for v in row), default=1)
    _matrix(ax, [[v or float("nan") for v in row] for row in matrix], labels, "viridis",
            lambda v: "" if v != v else f"{v:.0f}", LogNorm(1, max(2, most)))
    errors = sum(v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: {errors:,} test errors", fontsize=10)
    return _png(fig)


def _plain_log(ax) -> None:
    """A log y axis with few decades: 1-2-5 steps, printed as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def curves(histories: dict[str, list[dict]]) -> bytes:
    """Validation errors and training loss per epoch, one line per model."""
    columns = 1 + len(histories) // 16  # the legend sits beside the plots
    fig = _figure(8.0 + 1.6 * columns, 3.6)
    errors_ax, loss_ax = fig.subplots(1, 2)
    for name, history in histories.items():
        epochs = [r["epoch"] for r in history]
        errors_ax.plot(epochs, [r["val_errors"] for r in history], marker=".", label=name)
        loss_ax.plot(epochs, [r["loss"] for r in history], marker=".", label=name)
    errors_ax.set(xlabel="epoch", ylabel="validation errors", yscale="log")
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log")
    for ax in (errors_ax, loss_ax):
        _plain_log(ax)
    fig.legend(*errors_ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7,
               ncols=columns)
    return _png(fig)


def errors_by_hour(history: list[dict], offset: float = 0.0) -> tuple[list[float], list[int]]:
    """(hours spent after each epoch, counting from `offset` seconds; its test errors)."""
    hours, elapsed = [], offset
    for record in history:
        elapsed += record["seconds"]
        hours.append(elapsed / 3600)
    return hours, [record["test_errors"] for record in history]


def errors_vs_time(histories: dict[str, list[dict]], offsets: dict[str, float]) -> bytes:
    """Test errors against cumulative seconds of training and evaluation, one line per model;
    a model's line starts at its offset (a distilled student's: its teacher's seconds)."""
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    for name, history in histories.items():
        ax.plot(*errors_by_hour(history, offsets.get(name, 0.0)), marker=".", markersize=3,
                label=name)
    ax.set(xlabel="CPU hours (training and evaluation; a student's include its teacher's)",
           ylabel="test errors", yscale="log")
    _plain_log(ax)
    ax.legend(fontsize=8)
    ax.set_title("Test errors per CPU hour", fontsize=10)
    return _png(fig)


def temperature_grid(cells: dict[tuple[int, float], int], what: str) -> bytes:
    """Errors against temperature, one line per student width (the paper's T x width study)."""
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot()
    for width in sorted({w for w, _ in cells}):
        temps = sorted(t for w, t in cells if w == width)
        ax.plot(temps, [cells[(width, t)] for t in temps], marker="o", label=f"{width} units")
    ax.set(xscale="log", xlabel="temperature T", ylabel=what)
    ax.set_xticks(sorted({t for _, t in cells}), [f"{t:g}" for t in sorted({t for _, t in cells})])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax.set_title("Students: temperature x width", fontsize=10)
    return _png(fig)
