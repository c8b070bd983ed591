"""The rows a batch job writes, built the same way by every engine, so that their outputs compare row by row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sources import Source


@dataclass
class Truth:
    """The true class of each image of a source, as the model's class index (-1: unknown) and name."""
    index: np.ndarray   # [N] int64, or empty when the source has no labels
    names: np.ndarray   # [N] str

    @property
    def known(self) -> bool:
        return len(self.index) > 0


def positions_to_do(source: Source, written: list[dict], stop_after: int | None = None) -> tuple[np.ndarray, int]:
    """The positions of the images that have no row yet (at most `stop_after` of them), and how many of the
    input's images have one already: what makes a job run again do only what is missing."""
    done = {r["id"] for r in written}
    todo = np.flatnonzero(~np.isin(np.array(source.ids), list(done))) if done else np.arange(len(source))
    already = len(source) - len(todo)
    return (todo if stop_after is None else todo[:stop_after]), already


def prediction_rows(source: Source, positions: np.ndarray, labels: list[list[str]], scores: np.ndarray | list,
                    predicted: np.ndarray, truth: Truth) -> tuple[list[dict], np.ndarray]:
    """One row per image (its id, top-k labels and scores, its file, and whether it was right when the truth
    is known), and which images were mistakes."""
    # Scores to 6 decimals in one vectorised step (a whole number of millionths divided once gives the double
    # that prints as those decimals): a third of the rows' cost when rounded one by one.
    rounded = np.round(np.asarray(scores, np.float64), 6).tolist()
    ids, at = source.ids, positions.tolist()
    rows = [{"id": ids[pos], "labels": top, "scores": ranked} for pos, top, ranked in zip(at, labels, rounded, strict=True)]
    if source.files is not None:  # checked once here, not in a call per row: most inputs have no files
        for row, pos in zip(rows, at, strict=True):
            with_file(source, row, pos)
    mistake = np.zeros(len(rows), bool)
    if truth.known:
        names = truth.names[positions]
        known = names != ""  # folder inputs may mix labelled subfolders with unlabelled top-level files
        mistake = known & (predicted != truth.index[positions])
        for row, name, has, wrong in zip(rows, names.tolist(), known.tolist(), mistake.tolist(), strict=True):
            if has:
                row["true_label"], row["correct"] = name, not wrong
    return rows, mistake


def error_row(source: Source, position: int, status: str, message: str) -> dict:
    """The row of an image the model could not answer: `status` is the gRPC status name the server gives."""
    return with_file(source, {"id": source.ids[position], "error": f"{status}: {message}"}, position)


def with_file(source: Source, row: dict, position: int) -> dict:
    if source.files is not None:
        row["file"] = str(source.files[position])
    return row
