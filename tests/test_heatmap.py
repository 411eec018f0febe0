"""The PNG heatmap writer: pixels decoded back with zlib, labels, NaN cells, bad input."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest


def _read_png(path):
    """RGB pixels of a PNG written by ``write_heatmap`` (8-bit truecolour, filter 0)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * 3)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, 3)


def test_heatmap_png_pixels(tmp_path):
    from megacpp_mcore.train.heatmap import colormap, usage_matrix, write_heatmap

    matrix = np.array([[0.0, 1.0, np.nan], [0.5, 0.25, 1.0]])
    path = write_heatmap(matrix, ["layer 0 A", "layer 1 E"], tmp_path / "usage.png", vmin=0, vmax=1,
                         cell_width=5, cell_height=14)
    image = _read_png(path)
    left = image.shape[1] - 4 - 3 * 5  # right margin 4, three 5-pixel columns
    cell = lambda r, c: tuple(image[4 + r * 14 + 7, left + c * 5 + 2])  # noqa: E731
    assert cell(0, 0) == (68, 1, 84) and cell(0, 1) == (253, 231, 37) and cell(0, 2) == (128, 128, 128)
    assert cell(1, 0) == tuple(colormap(np.array(0.5))) == (33, 145, 140)
    label_area = image[4:4 + 28, 4:left - 4]
    assert (label_area == 0).all(axis=-1).any()  # labels drawn in black
    history = [{"decoder.layers.10.fraction_processed": 0.5, "decoder.layers.2.fraction_processed": 1.0,
                "decoder.layers.2.gate_mean": 0.9}, {"decoder.layers.2.fraction_processed": 0.75}]
    usage, labels = usage_matrix(history)
    assert labels == ["decoder.layers.2", "decoder.layers.10"]
    np.testing.assert_array_equal(usage, [[1.0, 0.75], [0.5, np.nan]])
    with pytest.raises(ValueError, match="no statistic named 'budget'"):
        usage_matrix(history, "budget")
    with pytest.raises(ValueError, match="2 rows but 1 row labels"):
        write_heatmap(matrix, ["x"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="must be 2-D and non-empty"):
        write_heatmap([1.0, 2.0], ["x"], tmp_path / "bad.png")


def test_usage_heatmaps_one_png_per_logged_statistic(tmp_path):
    """``train`` draws every dynamic-depth statistic its layers logged, on a fixed 0..1 scale; a
    run without such layers writes nothing."""
    from megacpp_mcore.train.heatmap import write_usage_heatmaps

    history = [{"decoder.layers.1.gate_mean": 0.0, "decoder.layers.3.gate_mean": 1.0,
                "decoder.layers.1.fraction_processed": 1.0, "decoder.layers.3.fraction_processed": 1.0,
                "loss": 3.0},
               {"decoder.layers.1.gate_mean": 0.5, "decoder.layers.3.gate_mean": 1.0,
                "decoder.layers.1.fraction_processed": 1.0, "decoder.layers.3.fraction_processed": 1.0}]
    written = write_usage_heatmaps(history, tmp_path / "run")
    assert written == {stat: str(tmp_path / f"run.{stat}.png") for stat in ("fraction_processed", "gate_mean")}
    image = _read_png(tmp_path / "run.gate_mean.png")
    left = image.shape[1] - 4 - 2 * 6  # right margin 4, two 6-pixel step columns
    cell = lambda r, c: tuple(image[4 + r * 14 + 7, left + c * 6 + 3])  # noqa: E731
    assert [cell(0, 0), cell(0, 1), cell(1, 0), cell(1, 1)] == [
        (68, 1, 84), (33, 145, 140), (253, 231, 37), (253, 231, 37)]  # 0, 0.5, 1, 1 on 0..1
    assert write_usage_heatmaps([{"loss": 1.0}], tmp_path / "dense") == {}
    assert not list(tmp_path.glob("dense*"))
