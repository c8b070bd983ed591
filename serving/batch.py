"""Batch classification of a whole data set through ClassifyStream: `python -m serving batch ...`.

    python -m serving batch --idx-images t10k-images-idx3-ubyte.gz --idx-labels t10k-labels-idx1-ubyte.gz \\
        --server host1:8001,host2:8001 --output preds.jsonl --cam-dir cams --cam-mistakes-only

Inputs: an IDX pair, an .npz (`images` uint8 [N, H, W(, C)], optional `labels`), a folder of images (one
subfolder per class gives labels) or a CSV/text list of paths (optional second column: the label).
Images go out in requests of --batch-size, at most --window requests in flight per stream, one stream per
server address, requests dealt round robin over the streams. Rows are appended to the output as answers
arrive, so an interrupted job resumes where it stopped: ids already in the output are skipped and a
half-written last line is dropped and redone. At the end a summary (accuracy, per-class precision and
recall, a confusion matrix and a contact sheet of the most confident mistakes) lands next to the output.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import io
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from .client import AsyncClassifierClient, ImageLike, ModelInfo
from .idx import IdxError
from .idx import read_idx as _read_idx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
LIST_SUFFIXES = {".csv", ".tsv", ".txt", ".lst", ".list"}
# Per-request errors worth sending again: the replica is busy or restarting, not the input being bad.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
# A whole stream that breaks (or goes silent past the deadline) is reopened on the same address.
STREAM_RETRYABLE = RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED}
_STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


class BatchError(RuntimeError):
    """The job cannot go on; the message says why and what to change."""


# -- inputs --------------------------------------------------------------------------------------------

def read_idx(path: str | Path) -> np.ndarray:
    try:
        return _read_idx(path)
    except IdxError as e:
        raise BatchError(str(e)) from None


@dataclass
class Source:
    """What to classify: ids (unique), pixels [N, H, W(, C)] or files, and raw labels when known."""
    description: str
    ids: list[str]
    pixels: np.ndarray | None = None
    files: list[Path] | None = None
    labels: np.ndarray | None = None       # int64 class indices or str class names, [N]

    def __len__(self) -> int:
        return len(self.ids)

    def images(self, positions: np.ndarray) -> Sequence[ImageLike]:
        if self.pixels is not None:
            return self.pixels[positions]   # the client sends each [H, W(, C)] slice as a uint8 tensor
        assert self.files is not None
        return [self.files[p] for p in positions.tolist()]

    def picture(self, position: int):
        """One input as a PIL image (for the contact sheet when the model cannot explain)."""
        from PIL import Image
        if self.pixels is not None:
            arr = self.pixels[position]
            return Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        assert self.files is not None
        return Image.open(self.files[position])


def _array_source(description: str, images: np.ndarray, labels: np.ndarray | None) -> Source:
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        raise BatchError(f"{description}: images must be uint8 [N, H, W] or [N, H, W, C], not "
                         f"{images.dtype} {list(images.shape)}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise BatchError(f"{description}: {len(images)} images but {len(labels)} labels")
        labels = labels.astype(np.int64) if labels.dtype.kind in "iub" else labels.astype(str)
    return Source(description, [str(i) for i in range(len(images))], pixels=images, labels=labels)


def load_idx(images: str | Path, labels: str | Path | None = None) -> Source:
    return _array_source(f"IDX {images}", read_idx(images), read_idx(labels) if labels else None)


def load_npz(path: str | Path) -> Source:
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data:
            raise BatchError(f"{path} holds {', '.join(data.files) or 'nothing'}; expected an array named 'images'")
        return _array_source(f"npz {path}", data["images"], data["labels"] if "labels" in data else None)


def load_folder(root: str | Path) -> Source:
    """Images under `root`; each top-level subfolder is a class (images inside it, at any depth)."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BatchError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
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
        raise BatchError(f"{path} lists no images")
    has_labels = any(labels)
    return Source(f"list {path}", ids, files=files, labels=np.array(labels) if has_labels else None)


def open_source(args: argparse.Namespace) -> Source:
    if args.idx_images:
        if args.input:
            raise BatchError("give either an INPUT or --idx-images, not both")
        return load_idx(args.idx_images, args.idx_labels)
    if args.idx_labels:
        raise BatchError("--idx-labels needs --idx-images")
    if not args.input:
        raise BatchError("nothing to classify: give an INPUT (folder, .npz, .csv/.txt list) or --idx-images")
    p = Path(args.input)
    if p.is_dir():
        return load_folder(p)
    if not p.exists():
        raise BatchError(f"{p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return load_npz(p)
    if suffix in LIST_SUFFIXES:
        return load_list(p)
    head = p.open("rb").read(4)
    if head[:2] in (b"\0\0", b"\x1f\x8b"):
        return load_idx(p)  # IDX images alone; labels only come with --idx-labels
    raise BatchError(f"cannot tell what {p} is: expected a folder, .npz, .csv/.txt list or IDX file")


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
              f"model's classes; those images count as mistakes", file=sys.stderr)
    values, inverse = np.unique(raw, return_inverse=True)
    index = np.array([lookup[v][0] for v in values.tolist()], np.int64)[inverse]
    names = np.array([lookup[v][1] for v in values.tolist()])[inverse]
    return index, names


# -- output --------------------------------------------------------------------------------------------

class Output:
    """Append-only JSONL or CSV of one row per image, readable back for resuming and the summary."""

    def __init__(self, path: str | Path, top_k: int):
        self.path = Path(path)
        self.csv = self.path.suffix.lower() == ".csv"
        self.columns = ["id", "file", "true_label", "correct", "error"] + [
            f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("label", "score")]
        self._file = None

    def resume(self) -> list[dict]:
        """Rows already written; a last line cut short by an interruption is removed from the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            print(f"{self.path}: dropping a half-written last line ({len(data) - cut} bytes); it is redone",
                  file=sys.stderr)
            with self.path.open("r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        text = data.decode("utf-8")
        if not self.csv:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise BatchError(f"{self.path}:{n} is not JSON ({e}); fix or remove the file") from None
            return rows
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return []
        if header != self.columns:
            raise BatchError(f"{self.path} has columns {header}; this run writes {self.columns} (another --top-k?). "
                             f"Use the same options or another --output")
        return [_row_from_csv(dict(zip(header, r, strict=False))) for r in reader if r]

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", encoding="utf-8", newline="")
        if self.csv and fresh:
            self._file.write(",".join(self.columns) + "\n")

    def append(self, rows: list[dict]) -> None:
        """One write and flush per answered request: an interruption loses at most the line being written."""
        if self.csv:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerows(_row_to_csv(r, self.columns) for r in rows)
            text = buf.getvalue()
        else:
            text = "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in rows)
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


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


def _cam_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("_") + ".png"


# -- the job -------------------------------------------------------------------------------------------

@dataclass
class _Request:
    request_id: str
    positions: np.ndarray
    attempts: int = 0


@dataclass
class JobOptions:
    model: str = ""
    top_k: int = 5
    batch_size: int = 64
    window: int = 8
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.2
    cam_dir: Path | None = None
    cam_mistakes_only: bool = False
    progress: bool = True


@dataclass
class RunStats:
    images: int = 0
    seconds: float = 0.0
    model_versions: set = field(default_factory=set)
    retired: list[str] = field(default_factory=list)


class StreamJob:
    """Deals requests round robin over one ClassifyStream per target and writes every answer."""

    def __init__(self, client: AsyncClassifierClient, source: Source, info: ModelInfo, true_index: np.ndarray,
                 true_names: np.ndarray, output: Output, todo: np.ndarray, done: int, options: JobOptions):
        self.client, self.source, self.info, self.output, self.o = client, source, info, output, options
        self.true_index, self.true_names = true_index, true_names
        self.has_labels = len(true_index) > 0
        self.queues: list[collections.deque[_Request]] = [collections.deque() for _ in client.targets]
        for n, start in enumerate(range(0, len(todo), options.batch_size)):
            self.queues[n % len(self.queues)].append(_Request(str(n), todo[start:start + options.batch_size]))
        self.live = list(range(len(self.queues)))
        self.stats = RunStats()
        self._cam_slots = asyncio.Semaphore(max(2, options.window))
        self._writes: list[asyncio.Task] = []          # explanations (then rows) not yet written
        self._last_write: dict[int, asyncio.Task] = {}  # per stream, so its rows keep the order answered
        self._bar = None
        self._total, self._initial = len(source), done

    async def run(self) -> RunStats:
        from tqdm import tqdm
        started = time.perf_counter()
        self._bar = tqdm(total=self._total, initial=self._initial, unit="img", disable=not self.o.progress,
                         smoothing=0.1, dynamic_ncols=True)
        try:
            while todo := [i for i in self.live if self.queues[i]]:
                try:
                    async with asyncio.TaskGroup() as group:
                        for i in todo:
                            group.create_task(self._stream(i))
                except ExceptionGroup as eg:  # the first failure tells the story; the rest are its echoes
                    raise eg.exceptions[0] from None
            await asyncio.gather(*self._writes)
        finally:
            self._bar.close()
            self.stats.seconds = time.perf_counter() - started
        return self.stats

    async def _stream(self, i: int) -> None:
        queue, target, failures = self.queues[i], self.client.targets[i], 0
        while queue and i in self.live:
            in_flight: collections.deque[_Request] = collections.deque()
            responses = self.client.classify_stream(self._feed(queue, in_flight), model=self.info.name,
                                                    top_k=self.o.top_k, window=self.o.window, target_index=i)
            try:
                while True:
                    try:
                        # A silent stream past the deadline is treated like a broken one.
                        async with asyncio.timeout(self.o.timeout_s):
                            response = await anext(responses)
                    except StopAsyncIteration:
                        break
                    request = in_flight.popleft()
                    if response.request_id != request.request_id:
                        raise BatchError(f"{target} answered request {response.request_id!r} where "
                                         f"{request.request_id!r} was due")
                    failures = 0
                    await self._answer(i, request, response)
            except (grpc.aio.AioRpcError, TimeoutError) as e:
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.DEADLINE_EXCEEDED
                detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else f"no answer in {self.o.timeout_s:g}s"
                if code not in STREAM_RETRYABLE:
                    raise BatchError(f"{target}: {code.name}: {detail}") from None
                queue.extendleft(reversed(in_flight))  # unanswered requests go again, first
                failures += 1
                if failures > self.o.retries:
                    self._retire(i, f"{code.name}: {detail}")
                    return
                await asyncio.sleep(self.o.backoff_s * 2 ** (failures - 1))
            finally:
                await responses.aclose()

    async def _feed(self, queue: collections.deque[_Request], in_flight: collections.deque[_Request]):
        while queue:
            request = queue.popleft()
            in_flight.append(request)  # before it is sent, so a broken stream knows what to redo
            yield request.request_id, self.source.images(request.positions)

    def _retire(self, i: int, reason: str) -> None:
        """A target that keeps failing hands its requests to the others."""
        target = self.client.targets[i]
        self.live.remove(i)
        self.stats.retired.append(f"{target} ({reason})")
        if not self.live:
            raise BatchError(f"every server failed; last: {target}: {reason}")
        print(f"\nwarning: giving up on {target} after {self.o.retries} retries ({reason}); its "
              f"{len(self.queues[i])} requests go to the other servers", file=sys.stderr)
        for n, request in enumerate(self.queues[i]):
            self.queues[self.live[n % len(self.live)]].append(request)
        self.queues[i].clear()

    async def _answer(self, i: int, request: _Request, response) -> None:
        queue = self.queues[i]
        if response.error_code:
            code = _STATUS_BY_VALUE.get(response.error_code, grpc.StatusCode.UNKNOWN)
            if code in RETRYABLE:
                request.attempts += 1
                if request.attempts > self.o.retries:
                    raise BatchError(f"request {request.request_id}: {code.name} after {self.o.retries} retries: "
                                     f"{response.error_message}")
                await asyncio.sleep(self.o.backoff_s * 2 ** (request.attempts - 1))
                queue.appendleft(request)
            elif len(request.positions) > 1:
                # One bad image fails its whole request: resend one by one to find it and keep the rest.
                queue.extendleft(reversed([_Request(f"{request.request_id}.{j}", request.positions[j:j + 1])
                                           for j in range(len(request.positions))]))
            else:
                pos = int(request.positions[0])
                row = {"id": self.source.ids[pos], "error": f"{code.name}: {response.error_message}"}
                self._write([self._with_file(row, pos)])
            return
        reply = response.response
        self.stats.model_versions.add((reply.model, reply.version))
        rows, predicted = [], np.empty(len(request.positions), np.int64)
        for j, (pos, result) in enumerate(zip(request.positions.tolist(), reply.results, strict=True)):
            preds = result.predictions
            predicted[j] = preds[0].index
            rows.append(self._with_file({"id": self.source.ids[pos], "labels": [p.label for p in preds],
                                         "scores": [round(p.score, 6) for p in preds]}, pos))
        mistake = np.zeros(len(rows), bool)
        if self.has_labels:
            names = self.true_names[request.positions]
            known = names != ""  # folder inputs may mix labelled subfolders with unlabelled top-level files
            mistake = known & (predicted != self.true_index[request.positions])
            for row, name, has, wrong in zip(rows, names.tolist(), known.tolist(), mistake.tolist(), strict=True):
                if has:
                    row["true_label"], row["correct"] = name, not wrong
        if self.o.cam_dir is None:
            self._write(rows)
            return
        wanted = mistake if self.o.cam_mistakes_only else np.ones(len(rows), bool)
        for task in [t for t in self._writes if t.done()]:
            self._writes.remove(task)
            task.result()  # a failed explanation stops the job here rather than at the end
        await self._cam_slots.acquire()  # bounds the explanations pending, which holds back the stream
        task = asyncio.create_task(self._explain_then_write(request.positions[wanted], rows, wanted,
                                                            self._last_write.get(i)))
        self._writes.append(task)
        self._last_write[i] = task

    async def _explain_then_write(self, positions: np.ndarray, rows: list[dict], wanted: np.ndarray,
                                  after: asyncio.Task | None) -> None:
        """CAM files first, then the rows: a resumed job never skips an image whose overlay is missing."""
        try:
            if len(positions):
                try:
                    explanations = await self.client.explain(self.source.images(positions), model=self.info.name,
                                                             overlay=True)
                except grpc.aio.AioRpcError as e:  # not the stream's failure: stop, the rows stay to be redone
                    raise BatchError(f"Explain failed: {e.code().name}: {e.details()}") from None
                for j, e in zip(np.flatnonzero(wanted).tolist(), explanations, strict=True):
                    path = self.o.cam_dir / _cam_name(rows[j]["id"])
                    path.write_bytes(e.overlay_png)
                    rows[j]["cam"] = str(path)
            if after is not None:
                await after
            self._write(rows)
        finally:
            self._cam_slots.release()

    def _with_file(self, row: dict, pos: int) -> dict:
        if self.source.files is not None:
            row["file"] = str(self.source.files[pos])
        return row

    def _write(self, rows: list[dict]) -> None:
        self.output.append(rows)
        self.stats.images += len(rows)
        self._bar.update(len(rows))


# -- summary -------------------------------------------------------------------------------------------

def summarize(rows: list[dict], classes: list[str]) -> dict:
    """Accuracy and per-class precision/recall over every row of the output (this run and earlier ones)."""
    by_name = {c: i for i, c in enumerate(classes)}
    ok = [r for r in rows if "error" not in r]
    summary: dict = {"images": len(rows), "classified": len(ok), "errors": len(rows) - len(ok)}
    labeled = [r for r in ok if r.get("true_label")]
    summary["labeled"] = len(labeled)
    if not labeled:
        return summary
    truth = np.array([by_name.get(r["true_label"], -1) for r in labeled], np.int64)
    predicted = np.array([by_name.get(r["labels"][0], -1) for r in labeled], np.int64)
    summary["accuracy"] = float(np.mean(truth == predicted))
    known = (truth >= 0) & (predicted >= 0)
    cm = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(cm, (truth[known], predicted[known]), 1)
    unknown = collections.Counter(r["true_label"] for r, t in zip(labeled, truth.tolist(), strict=True) if t < 0)
    if unknown:
        summary["labels_not_in_model"] = dict(unknown)
    support, predicted_count, hits = cm.sum(1), cm.sum(0), np.diag(cm)
    summary["per_class"] = {
        c: {"precision": float(hits[i] / predicted_count[i]) if predicted_count[i] else None,
            "recall": float(hits[i] / support[i]) if support[i] else None,
            "support": int(support[i])}
        for i, c in enumerate(classes)}
    summary["confusion_matrix"] = cm.tolist()
    return summary


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path | None:
    try:
        from training.plots import plot_confusion_matrix as plot
    except ImportError:
        print("matplotlib is not installed: no confusion-matrix PNG (pip install matplotlib)", file=sys.stderr)
        return None
    plot(cm, classes, path, title)
    return path


async def mistakes_sheet(client: AsyncClassifierClient, source: Source, rows: list[dict], model: str,
                         path: Path, count: int = 16, tile: int = 128, columns: int = 4) -> Path | None:
    """The most confident mistakes with their CAM overlays (the plain image if the model cannot explain)."""
    from PIL import Image, ImageDraw, ImageFont
    position = {image_id: p for p, image_id in enumerate(source.ids)}
    mistakes = [r for r in rows if r.get("correct") is False and r["id"] in position]
    mistakes.sort(key=lambda r: -r["scores"][0])
    mistakes = mistakes[:count]
    if not mistakes:
        return None
    positions = np.array([position[r["id"]] for r in mistakes])
    try:
        overlays = [Image.open(io.BytesIO(e.overlay_png)) for e in
                    await client.explain(source.images(positions), model=model, overlay=True)]
    except grpc.aio.AioRpcError as e:
        print(f"no CAM overlays on the mistakes sheet ({e.code().name}: {e.details()})", file=sys.stderr)
        overlays = [source.picture(int(p)) for p in positions]
    font = ImageFont.load_default()
    line = 12
    cols = min(columns, len(mistakes))
    rows_n = -(-len(mistakes) // cols)
    sheet = Image.new("RGB", (cols * tile, rows_n * (tile + 3 * line + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (row, picture) in enumerate(zip(mistakes, overlays, strict=True)):
        x, y = (n % cols) * tile, (n // cols) * (tile + 3 * line + 4)
        sheet.paste(picture.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        lines = (f"true: {row['true_label']}", f"pred: {row['labels'][0]} {100 * row['scores'][0]:.0f}%",
                 f"id: {row['id']}")
        for k, text in enumerate(lines):
            draw.text((x + 3, y + tile + 1 + k * line), text[:22], fill=(200, 0, 0) if k == 1 else "black", font=font)
    sheet.save(path)
    return path


def _print_summary(summary: dict) -> None:
    rate = summary.get("images_per_second")
    print(f"\n{summary['images']} images ({summary['images_this_run']} this run"
          + (f", {rate:.0f} images/s" if rate else "") + f"), {summary['errors']} errors")
    if "accuracy" in summary:
        print(f"accuracy {100 * summary['accuracy']:.2f}% over {summary['labeled']} labeled images")
        width = max(len(c) for c in summary["per_class"])
        print(f"  {'class':<{width}}  precision  recall  support")
        for c, m in summary["per_class"].items():
            p = "-" if m["precision"] is None else f"{100 * m['precision']:.1f}%"
            r = "-" if m["recall"] is None else f"{100 * m['recall']:.1f}%"
            print(f"  {c:<{width}}  {p:>9}  {r:>6}  {m['support']:>7}")
    for key in ("confusion_png", "mistakes_png", "summary_json"):
        if summary.get(key):
            print(f"{key.replace('_', ' ')}: {summary[key]}")


# -- command line --------------------------------------------------------------------------------------

async def run_job(args: argparse.Namespace) -> int:
    source = open_source(args)
    targets = [t.strip() for t in args.server.split(",") if t.strip()]
    async with AsyncClassifierClient(targets, timeout_s=args.timeout) as client:
        info = await client.get_model(args.model)
        top_k = max(1, min(args.top_k, len(info.labels)))
        output = Output(args.output, top_k)
        done = {r["id"] for r in output.resume()}
        todo = np.flatnonzero(~np.isin(np.array(source.ids), list(done))) if done else np.arange(len(source))
        already = len(source) - len(todo)  # ids of this input found in the output
        if args.stop_after is not None:
            todo = todo[:args.stop_after]
        true_index, true_names = resolve_labels(source.labels, info.labels)
        cam_dir = Path(args.cam_dir) if args.cam_dir else None
        if cam_dir and not info.supports_cam:
            print(f"warning: {info.name} cannot explain ({info.cam_unsupported_reason}); no CAM overlays",
                  file=sys.stderr)
            cam_dir = None
        if cam_dir:
            cam_dir.mkdir(parents=True, exist_ok=True)
        if cam_dir and args.cam_mistakes_only and source.labels is None:
            print("warning: --cam-mistakes-only without labels: no image is known to be a mistake", file=sys.stderr)
        print(f"{source.description}: {len(source)} images, {already} done already, {len(todo)} to classify "
              f"with {info.name} v{info.version} on {len(targets)} server(s)", file=sys.stderr)
        options = JobOptions(model=info.name, top_k=top_k, batch_size=args.batch_size, window=args.window,
                             timeout_s=args.timeout, retries=args.retries, cam_dir=cam_dir,
                             cam_mistakes_only=args.cam_mistakes_only, progress=not args.no_progress)
        output.open()
        try:
            job = StreamJob(client, source, info, true_index, true_names, output, todo, already, options)
            stats = await job.run()
        finally:
            output.close()
        if len(stats.model_versions) > 1:
            print(f"warning: the servers answered with different models: {sorted(stats.model_versions)}",
                  file=sys.stderr)
        rows = output.resume()
        left = len(source) - len({r["id"] for r in rows} & set(source.ids))
        if left:
            print(f"stopped with {left} of {len(source)} images still to classify; run the same command again "
                  f"(without --stop-after) to go on", file=sys.stderr)
            return 0
        summary = {"input": source.description, "output": str(output.path), "model": info.name,
                   "versions": sorted(v for _, v in stats.model_versions) or [info.version],
                   "servers": targets, **summarize(rows, info.labels), "images_this_run": stats.images,
                   "seconds": round(stats.seconds, 3),
                   "images_per_second": round(stats.images / stats.seconds, 1) if stats.images else None}
        if stats.retired:
            summary["servers_given_up"] = stats.retired
        base = str(output.path)
        if "confusion_matrix" in summary:
            png = plot_confusion_matrix(np.array(summary["confusion_matrix"]), info.labels,
                                        Path(base + ".confusion.png"), info.name)
            summary["confusion_png"] = str(png) if png else None
            sheet = await mistakes_sheet(client, source, rows, info.name, Path(base + ".mistakes.png"),
                                         count=args.sheet_size)
            summary["mistakes_png"] = str(sheet) if sheet else None
        summary["summary_json"] = base + ".summary.json"
        Path(summary["summary_json"]).write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="a folder of images (subfolders = classes), an .npz, a .csv/.txt "
                   "list (path[,label] per line) or an IDX images file")
    p.add_argument("--idx-images", help="IDX images file (.gz or not), e.g. t10k-images-idx3-ubyte.gz")
    p.add_argument("--idx-labels", help="IDX labels file matching --idx-images")
    p.add_argument("--server", default="127.0.0.1:8001", help="host:port, comma-separated for several "
                   "replicas (one stream each, requests dealt round robin)")
    p.add_argument("--model", default="", help="model name (default: the only one served)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a call (or a silent stream) may take")
    p.add_argument("-o", "--output", default="predictions.jsonl", help="JSONL, or CSV when it ends in .csv; "
                   "an existing file is resumed")
    p.add_argument("--batch-size", type=int, default=64, help="images per request")
    p.add_argument("--window", type=int, default=8, help="requests in flight per stream")
    p.add_argument("--top-k", type=int, default=5, help="predictions kept per image")
    p.add_argument("--cam-dir", help="write a CAM overlay PNG per image here (via Explain)")
    p.add_argument("--cam-mistakes-only", action="store_true", help="CAM overlays only for misclassified images")
    p.add_argument("--sheet-size", type=int, default=16, help="mistakes on the contact sheet")
    p.add_argument("--stop-after", type=int, help="classify at most this many images now, then stop (resumable)")
    p.add_argument("--retries", type=int, default=3, help="retries of a request or stream on UNAVAILABLE/busy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.window < 1:
        print("error: --batch-size and --window must be at least 1", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_job(args))
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("batch", help="classify a whole data set (IDX, npz, folder, list) to JSONL/CSV",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
