"""A batch job's output: one row per image, appended as answers arrive (JSONL, CSV, or a Parquet dataset of
part files), read back to resume an interrupted job and to summarise."""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from pathlib import Path

import orjson

from ..client.messages import IMAGE_SUFFIXES
from .errors import BatchError

PARQUET_EXTRA_HINT = "Parquet needs pyarrow: pip install 'cnn-serving[parquet]'"


class Output:
    """Append-only JSONL or CSV of one row per image, or a folder `*.parquet` of part files (one per
    append, each renamed into place whole), readable back for resuming and the summary."""

    def __init__(self, path: str | Path, top_k: int):
        self.path = Path(path)
        self.csv = self.path.suffix.lower() == ".csv"
        self.parquet = self.path.suffix.lower() == ".parquet"
        self.columns = ["id", "file", "true_label", "correct", "error"] + [
            f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("label", "score")]
        self._file = None
        self._parts = 0

    def resume(self) -> list[dict]:
        """Rows already written; a last line cut short by an interruption is removed from the file."""
        if not self.path.exists():
            return []
        if self.parquet:
            return _read_parquet_rows(self.path)
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            print(f"{self.path}: dropping a half-written last line ({len(data) - cut} bytes); it is redone",
                  file=sys.stderr)
            with self.path.open("r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        if not self.csv:
            rows = []
            for n, line in enumerate(data.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(orjson.loads(line))
                    except orjson.JSONDecodeError as e:
                        raise BatchError(f"{self.path}:{n} is not JSON ({e}); fix or remove the file") from None
            return rows
        text = data.decode("utf-8")
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return []
        if header != self.columns:
            raise BatchError(f"{self.path} has columns {header}; this run writes {self.columns} (another --top-k?). "
                             f"Use the same options or another --output")
        return [_row_from_csv(dict(zip(header, r, strict=False))) for r in reader if r]

    def open(self) -> None:
        if self.parquet:
            pyarrow_modules()  # without pyarrow, say so before an empty output folder is left behind
            self.path.mkdir(parents=True, exist_ok=True)
            self._parts = max((int(p.stem.split("-")[1]) + 1 for p in self.path.glob("part-*.parquet")), default=0)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("ab")
        if self.csv and fresh:
            self._file.write((",".join(self.columns) + "\n").encode())

    def append(self, rows: list[dict]) -> None:
        """One write and flush per answered request: an interruption loses at most the line being written."""
        if self.parquet:
            self._append_parquet(rows)
            return
        if self.csv:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerows(_row_to_csv(r, self.columns) for r in rows)
            data = buf.getvalue().encode()
        else:
            # orjson: the driver of a batch job encodes every row, and the standard library's encoder took a
            # third of its CPU (floats above all); orjson writes the same rows about 7 times faster (a
            # score that is NaN, from a model whose logits are not finite, is written as null).
            data = b"".join([orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows])
        self._file.write(data)
        self._file.flush()

    def _append_parquet(self, rows: list[dict]) -> None:
        pa, pq = pyarrow_modules()
        columns = {name: [r.get(name) for r in rows] for name in ("id", "file", "true_label", "correct", "error")}
        columns["labels"] = [r.get("labels") for r in rows]
        columns["scores"] = [r.get("scores") for r in rows]
        table = pa.table(columns, schema=_parquet_schema(pa))
        final = self.path / f"part-{self._parts:06d}.parquet"
        staging = final.with_name("." + final.name + ".tmp")
        pq.write_table(table, staging)
        os.replace(staging, final)  # a reader (or a resumed job) sees a part whole or not at all
        self._parts += 1

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def pyarrow_modules():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BatchError(PARQUET_EXTRA_HINT) from None
    return pa, pq


def _parquet_schema(pa):
    return pa.schema([("id", pa.string()), ("file", pa.string()), ("true_label", pa.string()),
                      ("correct", pa.bool_()), ("error", pa.string()), ("labels", pa.list_(pa.string())),
                      ("scores", pa.list_(pa.float64()))])


def _read_parquet_rows(path: Path) -> list[dict]:
    """Every row of the part files, as the dicts the other formats give (absent fields left out)."""
    pa, pq = pyarrow_modules()
    for stale in path.glob(".*.tmp"):  # a part being written when the job was stopped: redone
        stale.unlink()
    rows = []
    for part in sorted(path.glob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def _row_to_csv(row: dict, columns: list[str]) -> list:
    flat = {"id": row["id"], "file": row.get("file", ""), "true_label": row.get("true_label", ""),
            "correct": "" if "correct" not in row else str(row["correct"]).lower(), "error": row.get("error", "")}
    for i, (label, score) in enumerate(zip(row.get("labels", []), row.get("scores", []), strict=True), 1):
        flat[f"label_{i}"], flat[f"score_{i}"] = label, score
    return [flat.get(c, "") for c in columns]


def _row_from_csv(flat: dict) -> dict:
    row: dict = {"id": flat["id"]}
    for key in ("file", "true_label", "error"):
        if flat.get(key):
            row[key] = flat[key]
    if flat.get("correct"):
        row["correct"] = flat["correct"] == "true"
    k = sum(1 for c in flat if c.startswith("label_") and flat[c] != "")
    row["labels"] = [flat[f"label_{i}"] for i in range(1, k + 1)]
    row["scores"] = [float(flat[f"score_{i}"]) for i in range(1, k + 1)]
    return row


def cam_file_name(image_id: str) -> str:
    """`Bag/a.png` gives `Bag_a_cam.png` (as `explain` names its files), not `Bag_a.png.png`."""
    stem = image_id[: -len(Path(image_id).suffix)] if Path(image_id).suffix.lower() in IMAGE_SUFFIXES else image_id
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") + "_cam.png"
