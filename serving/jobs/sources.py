"""What a batch job classifies: an IDX pair, an .npz, a folder of images (one subfolder per class gives
labels) or a CSV/text list of paths (optional second column: the label), with ids unique per image."""

from __future__ import annotations

import argparse
import csv
import io
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..client import ImageLike
from ..client.messages import IMAGE_SUFFIXES, images_under
from ..idx import IdxError
from ..idx import read_idx as _read_idx
from .errors import InputError

LIST_SUFFIXES = {".csv", ".tsv", ".txt", ".lst", ".list"}


def read_idx(path: str | Path) -> np.ndarray:
    try:
        return _read_idx(path)
    except IdxError as e:
        raise InputError(str(e)) from None


@dataclass
class Source:
    """What to classify: ids (unique), and pixels [N, H, W(, C)], files or encoded images (one of the
    three), and raw labels when known."""
    description: str
    ids: list[str]
    pixels: np.ndarray | None = None
    files: list[Path] | None = None
    encoded: list[bytes] | None = None
    labels: np.ndarray | None = None       # int64 class indices or str class names, [N]

    def __len__(self) -> int:
        return len(self.ids)

    def images(self, positions: np.ndarray) -> Sequence[ImageLike]:
        if self.pixels is not None:
            return self.pixels[positions]   # the client sends each [H, W(, C)] slice as a uint8 tensor
        stored = self.files if self.files is not None else self.encoded
        assert stored is not None
        return [stored[p] for p in positions.tolist()]

    def picture(self, position: int) -> np.ndarray | Path | bytes:
        """One input as it is stored, for the contact sheet when the model cannot explain."""
        return self.images(np.array([position]))[0]


def _array_source(description: str, images: np.ndarray, labels: np.ndarray | None) -> Source:
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        raise InputError(f"{description}: images must be uint8 [N, H, W] or [N, H, W, C], not "
                         f"{images.dtype} {list(images.shape)}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise InputError(f"{description}: {len(images)} images but {len(labels)} labels")
        labels = labels.astype(np.int64) if labels.dtype.kind in "iub" else labels.astype(str)
    return Source(description, [str(i) for i in range(len(images))], pixels=images, labels=labels)


def load_idx(images: str | Path, labels: str | Path | None = None) -> Source:
    return _array_source(f"IDX {images}", read_idx(images), read_idx(labels) if labels else None)


def load_npz(path: str | Path) -> Source:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise InputError(f"{path} holds {', '.join(data.files) or 'nothing'}; expected an array named "
                                 f"'images'")
            return _array_source(f"npz {path}", data["images"], data["labels"] if "labels" in data else None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy's words for a file that is not an .npz ("pickled data", "Failed to interpret file") misread
        # the situation: say what the job expected.
        raise InputError(f"{path} is not a readable .npz of uint8 images ({type(e).__name__}: {e})") from None


def load_folder(root: str | Path) -> Source:
    """Images under `root`; each top-level subfolder is a class (images inside it, at any depth)."""
    root = Path(root)
    files = images_under(root)
    if not files:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    rel = [p.relative_to(root) for p in files]
    has_classes = any(len(r.parts) > 1 for r in rel)
    labels = np.array([r.parts[0] if len(r.parts) > 1 else "" for r in rel]) if has_classes else None
    return Source(f"folder {root}", [r.as_posix() for r in rel], files=files, labels=labels)


def load_list(path: str | Path) -> Source:
    """A CSV (or tab-separated / plain) list: path[,label] per line; relative paths are relative to the list."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else ","
    ids, files, labels, seen = [], [], [], set()
    for n, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter)):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        name = row[0].strip()
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        if n == 0 and name.lower() in ("path", "file", "filename", "image") and not file.exists():
            continue  # a header row
        if name in seen:
            print(f"warning: {path}:{n + 1}: {name} is listed again; classified once", file=sys.stderr)
            continue
        seen.add(name)
        ids.append(name)
        files.append(file)
        labels.append(row[1].strip() if len(row) > 1 else "")
    if not ids:
        raise InputError(f"{path} lists no images")
    has_labels = any(labels)
    return Source(f"list {path}", ids, files=files, labels=np.array(labels) if has_labels else None)


def load_parquet(path: str | Path) -> Source:
    """A Parquet file or dataset folder: a column `image` (encoded PNG/JPEG bytes) or `path` (image files,
    relative to the Parquet's folder), optional `id` (unique; default the row number) and `label`."""
    from .output import pyarrow_modules
    _, pq = pyarrow_modules()
    path = Path(path)
    table = pq.read_table(path)
    names = set(table.column_names)
    if not names & {"image", "path"}:
        raise InputError(f"{path} has columns {sorted(names)}; expected `image` (encoded bytes) or `path`")
    ids = [str(i) for i in table.column("id").to_pylist()] if "id" in names else [str(i) for i in range(len(table))]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: the `id` column repeats values; ids must be unique")
    labels = np.array([str(v) for v in table.column("label").to_pylist()]) if "label" in names else None
    if "image" in names:
        return Source(f"parquet {path}", ids, encoded=table.column("image").to_pylist(), labels=labels)
    base = path if path.is_dir() else path.parent
    files = [Path(p) if Path(p).is_absolute() else base / p for p in table.column("path").to_pylist()]
    return Source(f"parquet {path}", ids, files=files, labels=labels)


def open_source(args: argparse.Namespace) -> Source:
    if args.idx_images:
        if args.input:
            raise InputError("give either an INPUT or --idx-images, not both")
        return load_idx(args.idx_images, args.idx_labels)
    if args.idx_labels:
        raise InputError("--idx-labels needs --idx-images")
    if not args.input:
        raise InputError("nothing to classify: give an INPUT (folder, .npz, .csv/.txt list) or --idx-images")
    p = Path(args.input)
    if p.suffix.lower() == ".parquet":
        return load_parquet(p)
    if p.is_dir():
        return load_folder(p)
    if not p.exists():
        raise InputError(f"{p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return load_npz(p)
    if suffix in LIST_SUFFIXES:
        return load_list(p)
    head = p.open("rb").read(4)
    if head[:2] in (b"\0\0", b"\x1f\x8b"):
        return load_idx(p)  # IDX images alone; labels only come with --idx-labels
    raise InputError(f"cannot tell what {p} is: expected a folder, .npz, .csv/.txt list, .parquet or IDX file")


def resolve_labels(raw: np.ndarray | None, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Raw labels -> (model class index or -1, name) per image; names match the model's labels, and a
    string that is no label name but an integer in range is taken as an index."""
    n_classes = len(classes)
    if raw is None:
        return np.full(0, -1, np.int64), np.array([], dtype=str)
    if raw.dtype.kind == "i":
        index = np.where((raw >= 0) & (raw < n_classes), raw, -1)
        names = np.where(index >= 0, np.array(classes + [""])[index], raw.astype(str))
        return index, names
    by_name = {c: i for i, c in enumerate(classes)}
    lookup = {}
    for value in np.unique(raw).tolist():  # per distinct label, not per image
        if value in by_name:
            lookup[value] = (by_name[value], value)
        elif value.lstrip("-").isdigit() and 0 <= int(value) < n_classes:
            lookup[value] = (int(value), classes[int(value)])
        else:
            lookup[value] = (-1, value)
    unknown = sorted(v for v, (i, _) in lookup.items() if i < 0 and v)
    if unknown:
        print(f"warning: labels {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} are not among the "
              f"model's classes; those images count as mistakes (in the accuracy and in the precision of the class "
              f"they are given)", file=sys.stderr)
    values, inverse = np.unique(raw, return_inverse=True)
    index = np.array([lookup[v][0] for v in values.tolist()], np.int64)[inverse]
    names = np.array([lookup[v][1] for v in values.tolist()])[inverse]
    return index, names
