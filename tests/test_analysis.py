"""Appendix-B structure analysis across tokenizers: word pooling through offsets, distances, the box plot."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.analysis import box_plot, pool_words, structure_distances, word_ids


def test_word_ids_follow_characters_not_tokens():
    text = "Q: hi\nA: big cats run"
    start = text.index("big")
    # two tokenizations of the response: "big| cats| run" and "bi|g| ca|ts| r|un"
    a = np.array([[start, start + 3], [start + 3, start + 8], [start + 8, start + 12]])
    b = np.array(
        [
            [start, start + 2],
            [start + 2, start + 3],
            [start + 3, start + 6],
            [start + 6, start + 8],
            [start + 8, start + 10],
            [start + 10, start + 12],
        ]
    )
    assert word_ids(a, text, start).tolist() == [0, 1, 2]
    assert word_ids(b, text, start).tolist() == [0, 0, 1, 1, 2, 2]
    assert word_ids(np.array([[0, 2]]), text, start).tolist() == [-1]  # prompt tokens are outside


def test_structure_distance_is_zero_for_the_same_geometry_and_positive_otherwise():
    torch.manual_seed(0)
    h = torch.randn(6, 8, dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    assert max(structure_distances(h, h @ rot)) < 1e-5  # same geometry in another basis
    d_cos, d_prod = structure_distances(h, torch.randn(6, 8, dtype=torch.float64))
    assert d_cos > 0.05 and d_prod > 0.05
    pooled = pool_words(torch.arange(12.0).reshape(6, 2), np.array([0, 0, 1, -1, 1, 2]), 3)
    assert pooled.tolist() == [[1.0, 2.0], [6.0, 7.0], [10.0, 11.0]]


def test_box_plot_writes_a_png(tmp_path):
    png = box_plot(
        {"a": {"cos": [0.1, 0.2], "prod": [0.3, 0.2]}, "b": {"cos": [0.2], "prod": [0.1]}}, tmp_path / "s.png"
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
