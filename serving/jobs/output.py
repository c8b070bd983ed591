"""A batch job's output: one row per image, appended as answers arrive (JSONL, CSV, or a Parquet dataset of
part files), read back to resume an interrupted job and to summarise.

Next to it, `<output>.job.json` records the model and version that wrote the rows. It is written before the
first row, so rows never exist without it, and it is the one check of every engine when a job starts: an
output written with another model or version is refused rather than resumed (its rows would be counted as
done and summarised as this model's), unless the job is asked for a fresh output. It is a file of its own,
not a column, so that the three formats carry it alike and the rows of both engines stay the same.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..client.messages import IMAGE_SUFFIXES
from .errors import BatchError, OutputOfAnotherModel

PARQUET_EXTRA_HINT = "Parquet needs pyarrow: pip install 'cnn-serving[parquet]'"
MANIFEST_SUFFIX = ".job.json"
# What a job writes next to its rows, all of which describe the rows: a fresh output removes them with the rows.
REPORT_SUFFIXES = (".summary.json", ".confusion.png", ".mistakes.png")


@dataclass(frozen=True)
class WrittenWith:
    """The model version whose answers an output holds: the resolved name (also when the job named none and
    the server's only model answered) and the version number."""
    model: str
    version: int

    def __str__(self) -> str:
        return f"{self.model} v{self.version}"


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

    @property
    def manifest(self) -> Path:
        return Path(f"{self.path}{MANIFEST_SUFFIX}")

    def begin(self, written_with: WrittenWith, fresh: bool = False) -> list[dict]:
        """The rows a job writing with `written_with` finds already done, after checking that they are that
        model version's; the model version is recorded before any row is written. With `fresh` the old
        output and its report are discarded first. An output holding rows of another model or version, or
        rows that record none, is refused with OutputOfAnotherModel."""
        if fresh:
            self.discard()
        recorded = self.recorded()
        if recorded != written_with and self._holds_rows():
            if recorded is None:
                raise OutputOfAnotherModel(
                    f"{self.path} holds rows but no record of the model that wrote them ({self.manifest.name} is "
                    f"missing); give --fresh to discard it and classify with {written_with}, or another --output")
            raise OutputOfAnotherModel(
                f"{self.path} was written with {recorded}, not {written_with}: resuming would mix two models; "
                f"give --fresh to discard it and start again, or another --output")
        rows = self.resume()
        if recorded != written_with:
            _write_atomically(self.manifest, orjson.dumps({"model": written_with.model,
                                                           "version": written_with.version}) + b"\n")
        return rows

    def recorded(self) -> WrittenWith | None:
        """The model version recorded next to the output, or None when there is no record."""
        try:
            data = orjson.loads(self.manifest.read_bytes())
            return WrittenWith(str(data["model"]), int(data["version"]))
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise BatchError(f"{self.manifest} is not a record of a model and version ({e}); "
                             f"give --fresh to discard the output, or another --output") from None

    def discard(self) -> None:
        """Remove the rows, their record and the report written from them (a fresh output): only the files
        a job writes, so a Parquet folder keeps anything else put in it."""
        try:
            recorded = self.recorded()
        except BatchError:  # an unreadable record goes with the rows it was about
            recorded = None
        removed = self._holds_rows()
        if self.parquet and self.path.is_dir():
            for part in [*self.path.glob("part-*.parquet"), *self.path.glob(".*.tmp")]:
                part.unlink()
        elif self.path.is_file():
            self.path.unlink()
        for path in [self.manifest] + [Path(f"{self.path}{suffix}") for suffix in REPORT_SUFFIXES]:
            path.unlink(missing_ok=True)
        if removed:
            print(f"{self.path}: discarded the rows of {recorded or 'an unrecorded model'} (--fresh)", file=sys.stderr)

    def _holds_rows(self) -> bool:
        """Whether the output holds at least one whole row (a lone half-written line is no row: it is redone)."""
        if self.parquet:
            return self.path.is_dir() and any(self.path.glob("part-*.parquet"))
        if not self.path.is_file():
            return False
        with self.path.open("rb") as f:
            if self.csv:
                f.readline()  # the header
            return f.readline().endswith(b"\n")

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
                             f"Use the same options, --fresh or another --output")
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


def _write_atomically(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a job stopped while writing leaves the previous record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name("." + path.name + ".tmp")
    staging.write_bytes(data)
    os.replace(staging, path)


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
