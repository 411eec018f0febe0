"""A per-layer usage heatmap as a PNG, with numpy and zlib only (no matplotlib).

``write_heatmap(matrix, row_labels, path)`` draws ``matrix[row, col]`` (e.g. MoD fraction of tokens
processed per layer and training step) as coloured cells, one row per label, in a viridis-like
colour map from ``vmin`` (dark purple) to ``vmax`` (yellow); NaN cells are grey. Row labels are
drawn on the left with a built-in 3x5 pixel font (letters are shown upper case).
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# Viridis anchors (0, .25, .5, .75, 1), linearly interpolated.
_CMAP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_NAN_RGB = (128, 128, 128)
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)

# 3x5 glyphs: five rows of three pixels, "1" = ink.
_GLYPHS: dict[str, str] = {
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111",
    "3": "111 001 111 001 111", "4": "101 101 111 001 001", "5": "111 100 111 001 111",
    "6": "111 100 111 101 111", "7": "111 001 010 010 010", "8": "111 101 111 101 111",
    "9": "111 101 111 001 111", "A": "010 101 111 101 101", "B": "110 101 110 101 110",
    "C": "011 100 100 100 011", "D": "110 101 101 101 110", "E": "111 100 110 100 111",
    "F": "111 100 110 100 100", "G": "011 100 101 101 011", "H": "101 101 111 101 101",
    "I": "111 010 010 010 111", "J": "001 001 001 101 010", "K": "101 101 110 101 101",
    "L": "100 100 100 100 111", "M": "101 111 111 101 101", "N": "110 101 101 101 101",
    "O": "010 101 101 101 010", "P": "110 101 110 100 100", "Q": "010 101 101 110 011",
    "R": "110 101 110 101 101", "S": "011 100 010 001 110", "T": "111 010 010 010 010",
    "U": "101 101 101 101 111", "V": "101 101 101 101 010", "W": "101 101 111 111 101",
    "X": "101 101 010 101 101", "Y": "101 101 010 010 010", "Z": "111 001 010 100 111",
    " ": "000 000 000 000 000", ".": "000 000 000 000 010", "-": "000 000 111 000 000",
    "_": "000 000 000 000 111", ":": "000 010 000 010 000", "/": "001 001 010 100 100",
    "(": "010 100 100 100 010", ")": "010 001 001 001 010", "=": "000 111 000 111 000",
    "?": "111 001 011 000 010",
}
_SCALE = 2  # font pixels per glyph pixel
_GLYPH_W, _GLYPH_H = 4 * _SCALE, 5 * _SCALE  # 3 columns + 1 spacing


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN allowed) -> uint8 RGB of shape ``values.shape + (3,)``."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.minimum(np.floor(v).astype(int), len(_CMAP) - 2)
    frac = (v - lo)[..., None]
    rgb = _CMAP[lo] * (1.0 - frac) + _CMAP[lo + 1] * frac
    rgb = np.rint(rgb).astype(np.uint8)
    rgb[np.isnan(values)] = _NAN_RGB
    return rgb


def _draw_text(canvas: np.ndarray, text: str, top: int, left: int) -> None:
    for i, ch in enumerate(text.upper()):
        rows = _GLYPHS.get(ch, _GLYPHS["?"]).split()
        bits = np.array([[c == "1" for c in row] for row in rows])  # [5, 3]
        bits = np.kron(bits, np.ones((_SCALE, _SCALE), dtype=bool))
        x0 = left + i * _GLYPH_W
        canvas[top:top + bits.shape[0], x0:x0 + bits.shape[1]][bits] = _INK


def _png_bytes(image: np.ndarray) -> bytes:
    """RGB uint8 ``[H, W, 3]`` -> PNG file bytes (8-bit truecolour, no filtering)."""
    height, width, _ = image.shape
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + chunk(b"IEND", b""))


def write_heatmap(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    row_labels: Sequence[str],
    path: str | Path,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    cell_width: int = 6,
    cell_height: int = 14,
) -> Path:
    """Writes ``matrix`` ([rows, columns], e.g. layers x steps) as a PNG heatmap at ``path``.

    ``vmin``/``vmax`` default to the finite data range (pass ``0, 1`` for fractions); a constant
    matrix maps to the middle colour. Returns the path.
    """
    data = np.asarray(matrix, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"heatmap matrix must be 2-D and non-empty [rows, columns], got shape {data.shape}")
    labels = [str(label) for label in row_labels]
    if len(labels) != data.shape[0]:
        raise ValueError(f"heatmap has {data.shape[0]} rows but {len(labels)} row labels")
    for name, value in (("cell_width", cell_width), ("cell_height", cell_height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"heatmap {name} must be an int >= 1, got {value!r}")
    finite = data[np.isfinite(data)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi < lo:
        raise ValueError(f"heatmap vmax={hi} is below vmin={lo}")
    scaled = np.full_like(data, 0.5) if hi == lo else (data - lo) / (hi - lo)
    scaled[~np.isfinite(data)] = np.nan

    rows, cols = data.shape
    cell_height = max(cell_height, _GLYPH_H + 2)
    margin = 4
    label_width = max(len(label) for label in labels) * _GLYPH_W + 2 * margin
    height = rows * cell_height + 2 * margin
    width = label_width + cols * cell_width + margin
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = _BACKGROUND
    cells = np.repeat(np.repeat(colormap(scaled), cell_height, axis=0), cell_width, axis=1)
    canvas[margin:margin + rows * cell_height, label_width:label_width + cols * cell_width] = cells
    for r, label in enumerate(labels):
        _draw_text(canvas, label, margin + r * cell_height + (cell_height - _GLYPH_H) // 2, margin)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_png_bytes(canvas))
    return out


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def usage_matrix(history: Sequence[Mapping[str, float]], stat: str = "fraction_processed",
                 ) -> tuple[np.ndarray, list[str]]:
    """Per-step stats dicts (keys ``<module qualified name>.<stat>`` or ``.../<stat>``, as the
    training loop logs ``megacpp_stats()``) -> ``([layers, steps]`` matrix, row labels) for
    :func:`write_heatmap`. Rows are the modules reporting ``stat`` in natural order (layer 2 before
    layer 10); a step without a value is NaN."""
    suffixes = (f".{stat}", f"/{stat}")
    rows = sorted({key[: -len(stat) - 1] for step in history for key in step
                   if key.endswith(suffixes)}, key=_natural)
    if not rows:
        raise ValueError(f"no statistic named {stat!r} in the history (keys end with '.{stat}')")
    matrix = np.full((len(rows), len(history)), np.nan)
    for col, step in enumerate(history):
        for row, name in enumerate(rows):
            for sep in "./":
                value = step.get(f"{name}{sep}{stat}")
                if value is not None:
                    matrix[row, col] = float(value)
    return matrix, rows


# Per-layer dynamic-depth statistics drawn after a run, each in [0, 1]: MoD's fraction of tokens
# processed and gate mean, FlexiDepth's skip rate and router score mean.
USAGE_STATS = ("fraction_processed", "gate_mean", "skip_rate", "score_mean")


def write_usage_heatmaps(history: Sequence[Mapping[str, float]], stem: str | Path) -> dict[str, str]:
    """One PNG per statistic of :data:`USAGE_STATS` that the run logged (layers x logged steps, on
    a fixed 0..1 scale), at ``<stem>.<stat>.png``; returns ``{stat: path}`` (empty when the model
    has no dynamic-depth layer)."""
    written = {}
    for stat in USAGE_STATS:
        try:
            matrix, rows = usage_matrix(history, stat)
        except ValueError:  # no layer reports this statistic
            continue
        written[stat] = str(write_heatmap(matrix, rows, f"{stem}.{stat}.png", vmin=0.0, vmax=1.0))
    return written
