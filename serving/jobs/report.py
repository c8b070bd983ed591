"""What a batch job reports at the end, whichever engine classified: accuracy and per-class precision and
recall over every row of the output, the confusion matrix as a PNG and a contact sheet of the most
confident mistakes with their class activation maps.

The pictures need matplotlib and Pillow (the `[report]` extra); without them the job still writes its
rows and summary, and says what to install for the pictures.
"""

from __future__ import annotations

import collections
import io
import json
import sys
from pathlib import Path

import numpy as np

from .sources import Source

REPORT_EXTRA_HINT = "pip install 'cnn-serving[report]'"


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
    # An image whose label the model does not have (a `Handbag` folder) is a mistake in the accuracy, so it is
    # one in the precision too: its prediction counts against the class it was given.
    outside = predicted[(truth < 0) & (predicted >= 0)]
    support, hits = cm.sum(1), np.diag(cm)
    predicted_count = cm.sum(0) + np.bincount(outside, minlength=len(classes))
    summary["per_class"] = {
        c: {"precision": float(hits[i] / predicted_count[i]) if predicted_count[i] else None,
            "recall": float(hits[i] / support[i]) if support[i] else None,
            "support": int(support[i])}
        for i, c in enumerate(classes)}
    summary["confusion_matrix"] = cm.tolist()
    return summary


def unfinished(rows: list[dict], source: Source) -> bool:
    """Whether some image of the input has no row yet (a partial run): then say how to go on."""
    left = len(source) - len({r["id"] for r in rows} & set(source.ids))
    if left:
        print(f"stopped with {left} of {len(source)} images still to classify; run the same command again "
              f"(without --stop-after) to go on", file=sys.stderr)
    return bool(left)


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path | None:
    try:
        from ..charts import plot_confusion_matrix as plot
    except ImportError:
        print(f"matplotlib is not installed: no confusion-matrix PNG ({REPORT_EXTRA_HINT})", file=sys.stderr)
        return None
    plot(cm, classes, path, title)
    return path


def worst_mistakes(rows: list[dict], source: Source, count: int = 16) -> tuple[list[dict], np.ndarray]:
    """The most confident mistakes among the rows of this input, most confident first, and their positions
    in the input."""
    position = {image_id: p for p, image_id in enumerate(source.ids)}
    mistakes = [r for r in rows if r.get("correct") is False and r["id"] in position]
    mistakes.sort(key=lambda r: -(r["scores"][0] or 0))  # a score of null (NaN) last
    mistakes = mistakes[:count]
    return mistakes, np.array([position[r["id"]] for r in mistakes], np.int64)


def mistakes_sheet(mistakes: list[dict], pictures: list, path: Path, tile: int = 128, columns: int = 4) -> Path | None:
    """A contact sheet of mistakes, each over its picture: a CAM overlay PNG's bytes, or the input itself
    (uint8 pixels [H, W(, C)] or an image file) when the model cannot explain."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        print(f"Pillow is not installed: no contact sheet of mistakes ({REPORT_EXTRA_HINT})", file=sys.stderr)
        return None
    if not mistakes:
        return None
    pictures = [_as_image(Image, p) for p in pictures]
    font = ImageFont.load_default()
    line = 12
    cols = min(columns, len(mistakes))
    rows_n = -(-len(mistakes) // cols)
    sheet = Image.new("RGB", (cols * tile, rows_n * (tile + 3 * line + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (row, picture) in enumerate(zip(mistakes, pictures, strict=True)):
        x, y = (n % cols) * tile, (n // cols) * (tile + 3 * line + 4)
        sheet.paste(picture.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        lines = (f"true: {row['true_label']}", f"pred: {row['labels'][0]} {100 * row['scores'][0]:.0f}%",
                 f"id: {row['id']}")
        for k, text in enumerate(lines):
            draw.text((x + 3, y + tile + 1 + k * line), text[:22], fill=(200, 0, 0) if k == 1 else "black", font=font)
    sheet.save(path)
    return path


def _as_image(image_module, picture):
    if isinstance(picture, bytes):
        return image_module.open(io.BytesIO(picture))
    if isinstance(picture, np.ndarray):
        return image_module.fromarray(picture[:, :, 0] if picture.ndim == 3 and picture.shape[2] == 1 else picture)
    return image_module.open(picture)


def finish_report(summary: dict, classes: list[str], model: str, base: str, mistakes: list[dict],
                  pictures: list) -> dict:
    """The end of every engine's job: when the input had labels, `<base>.confusion.png` and the contact sheet
    `<base>.mistakes.png` of `mistakes` over their `pictures`; then `<base>.summary.json`, printed too."""
    if "confusion_matrix" in summary:
        png = plot_confusion_matrix(np.array(summary["confusion_matrix"]), classes, Path(base + ".confusion.png"),
                                    model)
        summary["confusion_png"] = str(png) if png else None
        sheet = mistakes_sheet(mistakes, pictures, Path(base + ".mistakes.png"))
        summary["mistakes_png"] = str(sheet) if sheet else None
    return write_summary(summary, base)


def write_summary(summary: dict, base: str) -> dict:
    """Write `<output>.summary.json` and print the summary; returns it with the file's path added."""
    summary["summary_json"] = base + ".summary.json"
    Path(summary["summary_json"]).write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
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
