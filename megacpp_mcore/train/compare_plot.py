"""The PNG of ``megacpp-mcore compare``: validation bits per byte against step and against training
tokens for every run, then each run's per-layer dynamic-depth usage heatmaps.

Drawn with numpy like :mod:`megacpp_mcore.train.heatmap` (its 3x5 font, colour map and PNG
writer; no matplotlib dependency). :func:`plot` lays the figure out as data (:class:`Figure`: the
series each panel draws, with the pixel mapping of its axes), :func:`render` rasterises it and
:func:`write_png` writes it atomically, so a test can read back exactly what was plotted.
An INVALID run draws no curve (it shows INVALID instead of numbers, as in the table); its legend
entry says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from megacpp_mcore.train import heatmap
from megacpp_mcore.train.compare import RunRow

# tab10: distinct on white, one per run (cycled beyond ten runs).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
GRID, INK, WHITE = (225, 225, 225), (0, 0, 0), (255, 255, 255)
CHAR_W, LINE_H = heatmap._GLYPH_W, heatmap._GLYPH_H + 4  # text metrics of the 3x5 font
MARGIN, Y_LABELS, X_LABELS, TITLE = 10, 7 * CHAR_W, 2 * LINE_H + 4, LINE_H + 4
PLOT_W, PLOT_H, GAP = 440, 240, 24
WIDTH = 2 * (MARGIN + Y_LABELS + PLOT_W) + GAP
CELL_H = heatmap._GLYPH_H + 2


@dataclasses.dataclass(frozen=True)
class Series:
    """One run's curve: finite ``(x, y)`` points and its best (lowest) point."""

    label: str
    color: tuple[int, int, int]
    x: tuple[float, ...]
    y: tuple[float, ...]
    best: tuple[float, float] | None


@dataclasses.dataclass(frozen=True)
class Panel:
    """A line chart: its series and where its plot box lies on the canvas."""

    title: str
    x_label: str
    series: tuple[Series, ...]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    top: int
    left: int

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """Canvas ``(row, column)`` of data point ``(x, y)``."""
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        col = self.left + (x - x0) / (x1 - x0) * (PLOT_W - 1)
        row = self.top + (1.0 - (y - y0) / (y1 - y0)) * (PLOT_H - 1)
        return int(round(row)), int(round(col))


@dataclasses.dataclass(frozen=True)
class HeatmapBlock:
    """One run's usage statistic: ``matrix`` [layers, logged steps] in 0..1, one row per label."""

    title: str
    matrix: np.ndarray
    rows: tuple[str, ...]
    top: int
    cell_w: int


@dataclasses.dataclass(frozen=True)
class Figure:
    """Everything :func:`render` draws, in canvas pixels."""

    panels: tuple[Panel, ...]
    legend: tuple[tuple[str, tuple[int, int, int]], ...]
    legend_top: int
    heatmaps: tuple[HeatmapBlock, ...]
    height: int
    width: int = WIDTH


def _range(values: Sequence[float], pad: float) -> tuple[float, float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        return lo - 1.0, hi + 1.0
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _series(rows: Sequence[RunRow], axis: str) -> list[Series]:
    out = []
    for i, r in enumerate(rows):
        if not r.valid:
            continue
        xs = r.steps if axis == "step" else r.tokens
        points = [(float(x), v) for x, v in zip(xs, r.bpb) if x is not None and v is not None]
        best_x = r.best_step if axis == "step" else r.best_tokens
        best = (float(best_x), r.best_bpb) if r.best_bpb is not None and best_x is not None else None
        out.append(Series(r.label, PALETTE[i % len(PALETTE)], tuple(p[0] for p in points),
                          tuple(p[1] for p in points), best))
    return out


def plot(rows: Sequence[RunRow]) -> Figure:
    """The figure of the compared runs (laid out, not drawn)."""
    panels = []
    for k, (axis, label) in enumerate((("step", "step"), ("tokens", "training tokens"))):
        series = _series(rows, axis)
        panels.append(Panel(
            title=f"validation bits/byte vs {label}", x_label=label, series=tuple(series),
            x_range=_range([x for s in series for x in s.x], 0.02),
            y_range=_range([y for s in series for y in s.y], 0.05),
            top=MARGIN + TITLE, left=MARGIN + Y_LABELS + k * (PLOT_W + GAP + Y_LABELS + MARGIN)))
    legend = []
    for i, r in enumerate(rows):
        # the 3x5 font has no ',' or ';': notes are separated by ' / '
        notes = ["INVALID: " + " ".join(e["rule"] for e in r.invalid)] if r.invalid else []
        notes += ["other substrate"] if r.differs else []
        legend.append((r.label + (f" ({' / '.join(notes)})" if notes else ""), PALETTE[i % len(PALETTE)]))
    legend_top = MARGIN + TITLE + PLOT_H + X_LABELS
    top = legend_top + len(legend) * LINE_H + MARGIN
    blocks = []
    for r in rows:
        for stat in heatmap.USAGE_STATS:
            try:
                matrix, names = heatmap.usage_matrix(r.stats_history, stat)
            except ValueError:  # this run logged no such statistic (no dynamic-depth layer)
                continue
            label_w = max(len(n) for n in names) * CHAR_W + MARGIN
            room = WIDTH - 2 * MARGIN - label_w
            if matrix.shape[1] > room:  # more logged steps than pixels: evenly spaced columns
                matrix = matrix[:, np.linspace(0, matrix.shape[1] - 1, room).round().astype(int)]
            blocks.append(HeatmapBlock(f"{r.label}: {stat} per layer (0..1) over logged steps",
                                       matrix, tuple(names), top + LINE_H,
                                       max(1, min(12, room // matrix.shape[1]))))
            top += LINE_H + len(names) * CELL_H + MARGIN
    return Figure(tuple(panels), tuple(legend), legend_top, tuple(blocks), top)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round values inside ``[lo, hi]``, about ``count`` of them: spaced 1, 2 or 5 x a power of
    ten, whichever is nearest (by ratio) to an even split."""
    raw = (hi - lo) / count
    mag = 10.0 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(value: float, spacing: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale and spacing >= scale / 100:
            return f"{value / scale:.{max(0, -math.floor(math.log10(spacing / scale)))}f}{suffix}"
    return f"{value:.{max(0, -math.floor(math.log10(spacing)))}f}"


def _text(canvas: np.ndarray, text: str, top: int, left: int) -> None:
    room = (canvas.shape[1] - left) // CHAR_W  # the font does not clip: cut the text instead
    heatmap._draw_text(canvas, text[:max(room, 0)], top, max(left, 0))


def _line(canvas: np.ndarray, a: tuple[int, int], b: tuple[int, int], color, width: int = 2) -> None:
    n = max(abs(b[0] - a[0]), abs(b[1] - a[1])) + 1
    rows = np.rint(np.linspace(a[0], b[0], n)).astype(int)
    cols = np.rint(np.linspace(a[1], b[1], n)).astype(int)
    for dr in range(width):
        for dc in range(width):
            canvas[np.clip(rows + dr, 0, canvas.shape[0] - 1), np.clip(cols + dc, 0, canvas.shape[1] - 1)] = color


def _square(canvas: np.ndarray, centre: tuple[int, int], half: int, color, hollow: bool = False) -> None:
    r, c = centre
    r0, r1, c0, c1 = max(r - half, 0), r + half + 1, max(c - half, 0), c + half + 1
    if hollow:
        for a, b in (((r0, c0), (r0, c1 - 1)), ((r1 - 1, c0), (r1 - 1, c1 - 1)),
                     ((r0, c0), (r1 - 1, c0)), ((r0, c1 - 1), (r1 - 1, c1 - 1))):
            _line(canvas, a, b, color, width=1)
    else:
        canvas[r0:r1, c0:c1] = color


def _draw_panel(canvas: np.ndarray, p: Panel) -> None:
    _text(canvas, p.title, MARGIN, p.left)
    bottom, right = p.top + PLOT_H - 1, p.left + PLOT_W - 1
    for axis, (lo, hi) in (("x", p.x_range), ("y", p.y_range)):
        ticks = _ticks(lo, hi)
        spacing = ticks[1] - ticks[0] if len(ticks) > 1 else hi - lo
        for t in ticks:
            label = _tick_label(t, spacing)
            if axis == "x":
                col = p.pixel(t, p.y_range[0])[1]
                _line(canvas, (p.top, col), (bottom, col), GRID, width=1)
                _text(canvas, label, bottom + 4, col - len(label) * CHAR_W // 2)
            else:
                row = p.pixel(p.x_range[0], t)[0]
                _line(canvas, (row, p.left), (row, right), GRID, width=1)
                _text(canvas, label, row - heatmap._GLYPH_H // 2, p.left - (len(label) + 1) * CHAR_W)
    _text(canvas, p.x_label, bottom + 4 + LINE_H, p.left + PLOT_W // 2 - len(p.x_label) * CHAR_W // 2)
    for s in p.series:
        points = [p.pixel(x, y) for x, y in zip(s.x, s.y)]
        for a, b in zip(points, points[1:]):
            _line(canvas, a, b, s.color)
        for point in points:
            _square(canvas, point, 2, s.color)
        if s.best is not None:  # the best evaluation: a ring around its marker
            _square(canvas, p.pixel(*s.best), 5, s.color, hollow=True)
    for a, b in (((p.top, p.left), (p.top, right)), ((bottom, p.left), (bottom, right)),
                 ((p.top, p.left), (bottom, p.left)), ((p.top, right), (bottom, right))):
        _line(canvas, a, b, INK, width=1)


def render(figure: Figure) -> np.ndarray:
    """The figure as RGB pixels ``[height, width, 3]`` (uint8)."""
    canvas = np.empty((figure.height, figure.width, 3), dtype=np.uint8)
    canvas[:] = WHITE
    for panel in figure.panels:
        _draw_panel(canvas, panel)
    for i, (label, color) in enumerate(figure.legend):
        top = figure.legend_top + i * LINE_H
        canvas[top:top + heatmap._GLYPH_H, MARGIN:MARGIN + 2 * CHAR_W] = color
        _text(canvas, label, top, MARGIN + 3 * CHAR_W)
    for block in figure.heatmaps:
        _text(canvas, block.title, block.top - LINE_H, MARGIN)
        label_w = max(len(n) for n in block.rows) * CHAR_W + MARGIN
        cells = heatmap.colormap(block.matrix)  # [layers, steps, 3]
        cells = np.repeat(np.repeat(cells, CELL_H, axis=0), block.cell_w, axis=1)
        left = MARGIN + label_w
        canvas[block.top:block.top + cells.shape[0], left:left + cells.shape[1]] = cells
        for r, name in enumerate(block.rows):
            _text(canvas, name, block.top + r * CELL_H + 1, MARGIN)
    return canvas


def write_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Renders ``figure`` and writes it at ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    data = heatmap._png_bytes(render(figure))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
