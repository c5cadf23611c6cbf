"""The ``wbcid`` command: a thin layer over the Python API (train, evaluate, predict, models)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import WbcidError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Identify white blood cells in blood-smear images.")
log = logging.getLogger("wbcid")

Data = Annotated[Path, typer.Option("--data", help="Manifest CSV, ImageFolder root, or labels JSON.")]
Sources = Annotated[Optional[list[str]], typer.Option("--source", help="Keep only this source (repeatable).")]
Splits = Annotated[Optional[list[str]], typer.Option("--split", help="Keep only this split (repeatable).")]
ModelPath = Annotated[Path, typer.Option("--model", help="Run directory or model .pt file.")]


@app.command()
def train(
    data: Data,
    out: Annotated[Path, typer.Option(help="Run directory to create (or continue with --resume).")],
    source: Sources = None,
    model: Annotated[str, typer.Option(help="Registered model (see `wbcid models`) or timm:<name>.")] = "efficientnet_lite0",
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 2e-3,
    freeze: Annotated[Optional[str], typer.Option(help="none, backbone, or N leading layer groups; default: the model's.")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Input size in pixels; default: the model's.")] = None,
    balanced: Annotated[bool, typer.Option(help="Class-weighted loss for skewed class counts.")] = False,
    augment: bool = True,
    pretrained: Annotated[bool, typer.Option(help="Start from ImageNet weights.")] = True,
    weights: Annotated[Optional[Path], typer.Option(help="Local ImageNet weights file for the backbone.")] = None,
    download_weights: Annotated[bool, typer.Option(help="Allow downloading ImageNet weights.")] = False,
    patience: int = 3,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Train a classifier; writes the model, config, history and report to --out."""
    from .data import read_cells
    from .train import TrainConfig, fit

    config = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr,
                         freeze=int(freeze) if freeze and freeze.isdigit() else freeze,
                         input_size=input_size, pretrained=pretrained, weights=str(weights) if weights else None,
                         download_weights=download_weights, balanced=balanced, patience=patience,
                         augment=augment, seed=seed)
    try:
        fit(read_cells(data, source), out, config, resume=resume)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; finished epochs are saved. Continue with the same command plus --resume.", err=True)
        raise typer.Exit(130)
    typer.echo(f"run written to {out} (report: {out / 'report.md'})")


@app.command()
def evaluate(
    model: ModelPath,
    data: Data,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, report.md and figures.")],
    source: Sources = None,
    split: Splits = None,
) -> None:
    """Score a model on labelled images (any layout); writes metrics.json and report.md."""
    from .evaluate import evaluate as run_evaluation

    metrics = run_evaluation(model, data, out, source, split)
    typer.echo(f"n={metrics['n']} accuracy={metrics['accuracy']:.4f} "
               f"balanced_accuracy={metrics['balanced_accuracy']:.4f} macro_f1={metrics['macro_f1']:.4f}")
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Images or folders (searched recursively).")],
    model: ModelPath,
    out: Annotated[Path, typer.Option(help="CSV to write.")],
) -> None:
    """Classify images; writes one CSV row per image with all five class probabilities."""
    from .predict import predict as run_prediction

    table = run_prediction(model, paths, out)
    counts = table["label"].replace("", "(unreadable)").value_counts()
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))
    typer.echo(f"predictions: {out}")


@app.command()
def models() -> None:
    """List the registered models."""
    from .models import list_models

    for spec in list_models():
        typer.echo(f"{spec.name:20s} {spec.input_size:4d}px  freeze={spec.freeze!s:9s} {spec.description}")
    typer.echo(f"{'timm:<name>':20s} any timm architecture (ImageNet weights with --download-weights or --weights)")


def main() -> None:
    """Entry point: user errors become one clear line and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        app()
    except WbcidError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2)
