"""Figures and Markdown reports: training history, confusion matrices, metric tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data import CLASSES

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from .smear.counting import CellCall


def _figure(width: float, height: float) -> Figure:
    """A matplotlib figure. Imported here, not at the top: the count report draws none and starts
    0.4 s sooner; and no pyplot, so importing wbcid never switches the caller's backend."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_history(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train against validation (the original project's plot)."""
    epochs = [h["epoch"] for h in history]
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=key, title=key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> Path:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    counts = np.asarray(matrix)
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    fig = _figure(12, 5)
    axes = fig.subplots(1, 2)
    for ax, values, fmt, name in ((axes[0], counts, "d", "counts"), (axes[1], normalised, ".2f", "row-normalised")):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(
                j,
                i,
                format(v, fmt),
                ha="center",
                va="center",
                color="white" if normalised[i, j] > 0.6 else "black",
                fontsize=9,
            )
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set(xlabel="predicted", ylabel="true", title=name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def metrics_table(rows: dict[str, dict]) -> str:
    """Markdown table of headline metrics, one row per named test set."""
    lines = ["| set | n | accuracy | balanced accuracy | macro-F1 |", "|---|---:|---:|---:|---:|"]
    for name, m in rows.items():
        scores = [_with_interval(m, key) for key in ("accuracy", "balanced_accuracy", "macro_f1")]
        lines.append(f"| {name} | {m['n']} | {' | '.join(scores)} |")
    return "\n".join(lines)


def _with_interval(metrics: dict, key: str) -> str:
    """The score, and its 95 % bootstrap interval in brackets where the metrics hold one."""
    interval = metrics.get("ci95", {}).get(key)
    return f"{metrics[key]:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def per_class_table(metrics: dict) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, s in metrics["per_class"].items():
        fmt = [("-" if s[k] is None else f"{s[k]:.4f}") for k in ("precision", "recall", "f1")]
        lines.append(f"| {name} | {' | '.join(fmt)} | {s['support']} |")
    return "\n".join(lines)


def write_evaluation_report(metrics: dict, out_dir: Path, title: str) -> Path:
    """report.md with the headline table, per-class scores and the confusion-matrix figure."""
    plot_confusion(metrics["confusion_matrix"], metrics["labels"], out_dir / "confusion_matrix.png", title)
    absent = [c for c in metrics["labels"] if c not in metrics["classes_present"]]
    notes = []
    if absent:
        notes.append(f"Classes absent from this test set (not averaged): {', '.join(absent)}.")
    if metrics.get("flagged"):
        f = metrics["flagged"]
        rest = (
            "" if f["accuracy_unflagged"] is None else f"; accuracy on the other cells: {f['accuracy_unflagged']:.4f}"
        )
        notes.append(
            f"{f['flagged']} cell(s) ({f['flagged_share']:.1%}) were flagged as unlike the training "
            f"cells (ood_score > 1){' or had a problem below' * bool(metrics.get('problems'))}{rest}."
        )
    for problem, count in metrics.get("problems", {}).items():
        notes.append(f"{count} image(s): {problem}.")
    if metrics.get("unreadable"):
        notes.append(f"{metrics['unreadable']} unreadable image(s) were left out.")
    for reason, count in metrics.get("skipped", {}).items():
        notes.append(f"Skipped {count} image(s): {reason}.")
    text = "\n\n".join(
        [
            f"# {title}",
            metrics_table({"test": metrics}),
            "Macro-F1 and balanced accuracy average over the classes present in the test set. In brackets: "
            "95 % bootstrap intervals (whole groups resampled where cells share one: a field, a specimen).",
            "## Per class",
            per_class_table(metrics),
            *notes,
            "## Confusion matrix",
            "![confusion matrix](confusion_matrix.png)",
        ]
    )
    path = out_dir / "report.md"
    path.write_text(text + "\n")
    return path


def write_run_report(out: Path, config: dict, val: dict) -> Path:
    """A training run's report.md: model, data, class counts per split, validation scores, history."""
    model, data = config["model"], config["train"]["data"]
    lines = [
        f"# Training run: {model['model']}",
        f"Data: `{data['origin']}`; model input {model['input_size']} px, freeze {model['freeze']!r}.",
        "| split | " + " | ".join(CLASSES) + " |\n|---|" + "---:|" * len(CLASSES),
    ]
    for split in ("train", "val"):
        lines[-1] += f"\n| {split} | " + " | ".join(str(data[split][c]) for c in CLASSES) + " |"
    lines += [
        "## Validation (best epoch)",
        metrics_table({"validation": val}),
        "## History",
        "![history](history.png)",
        "Validation confusion matrix: [val/report.md](val/report.md)",
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(lines) + "\n")
    return path


def write_count_report(result: dict, flagged_cells: list[tuple[dict, CellCall, Image.Image]], out_dir: Path) -> Path:
    """``report.html`` for a differential count: table, annotated fields, flagged cells (saved to flagged/)."""
    import jinja2

    (out_dir / "flagged").mkdir(exist_ok=True)
    flagged = []
    for i, (entry, call, patch) in enumerate(flagged_cells):
        src = f"flagged/{i:04d}.jpg"
        patch.save(out_dir / src, quality=90)
        flagged.append(
            {
                "src": src,
                "field": Path(entry["path"]).name,
                "label": call.label,
                "confidence": call.confidence,
                "ood_score": call.ood_score,
                "edge": call.edge,
            }
        )
    problems = [
        {"path": e["path"], "message": "; ".join(([e["error"]] if "error" in e else []) + e["warnings"])}
        for e in result["images"]
        if "error" in e or e["warnings"]
    ]
    env = jinja2.Environment(loader=jinja2.PackageLoader("wbcid"), autoescape=True)
    html = env.get_template("count_report.html").render(
        n_images=len(result["images"]),
        totals=result["totals"],
        model=result["model"],
        detector=result["detector"],
        specimens=result["specimens"],
        warnings=result["warnings"],
        images=result["images"],
        reference=result["reference"],
        flagged=flagged,
        problems=problems,
    )
    path = out_dir / "report.html"
    path.write_text(html)
    return path
