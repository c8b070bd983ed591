"""The rows every batch engine writes, without a server: what is left to do, predictions, mistakes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.jobs.rows import Truth, error_row, positions_to_do, prediction_rows
from serving.jobs.sources import Source


def source(n: int = 4, files: bool = False) -> Source:
    return Source("test", [f"img{i}" for i in range(n)], pixels=np.zeros((n, 2, 2), np.uint8),
                  files=[Path(f"/data/{i}.png") for i in range(n)] if files else None)


def test_only_the_images_without_a_row_are_left_to_do():
    todo, already = positions_to_do(source(), [{"id": "img1"}, {"id": "img3"}])
    assert todo.tolist() == [0, 2] and already == 2
    todo, already = positions_to_do(source(), [], stop_after=3)
    assert todo.tolist() == [0, 1, 2] and already == 0


def test_prediction_rows_round_scores_and_mark_mistakes_where_the_truth_is_known():
    truth = Truth(np.array([0, 1, -1, 2]), np.array(["cat", "dog", "", "bird"]))
    positions = np.array([0, 1, 2, 3])
    labels = [["cat", "dog"], ["cat", "dog"], ["dog", "cat"], ["cat", "bird"]]
    scores = np.array([[0.91234567, 0.05], [0.6, 0.3], [0.7, 0.2], [0.5, 0.4]])
    predicted = np.array([0, 0, 1, 0])
    rows, mistakes = prediction_rows(source(files=True), positions, labels, scores, predicted, truth)
    assert rows[0] == {"id": "img0", "labels": ["cat", "dog"], "scores": [0.912346, 0.05], "file": "/data/0.png",
                       "true_label": "cat", "correct": True}
    assert rows[1]["correct"] is False and "true_label" not in rows[2]  # an image without a label has no verdict
    assert mistakes.tolist() == [False, True, False, True]


def test_an_error_row_names_the_status_and_the_file():
    assert error_row(source(files=True), 2, "INVALID_ARGUMENT", "cannot decode") == {
        "id": "img2", "error": "INVALID_ARGUMENT: cannot decode", "file": "/data/2.png"}
