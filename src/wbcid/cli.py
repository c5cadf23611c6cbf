"""The ``wbcid`` command: a thin layer over the Python API (train, evaluate, predict, count, explain, ...)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from .errors import WbcidError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Identify white blood cells in blood-smear images.",
    rich_markup_mode=None,  # plain help: about 0.1 s to print, not 0.2-0.3 (rich), and wraps in any terminal
)
log = logging.getLogger("wbcid")

Data = Annotated[Path, typer.Option("--data", help="Manifest CSV, ImageFolder root, or labels JSON.")]
Sources = Annotated[list[str] | None, typer.Option("--source", help="Keep only this source (repeatable).")]
Splits = Annotated[list[str] | None, typer.Option("--split", help="Keep only this split (repeatable).")]
ModelPath = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Run directory or model file (.pt; or a `wbcid export` .onnx to predict, evaluate or count); "
        "default: the bundled pretrained model.",
    ),
]
Augment = Annotated[
    str,
    typer.Option(
        help="Training augmentation: none, basic, domain (stain, colour, blur, scale), "
        "domain+lowres (plus camera resolution)."
    ),
]
Crop = Annotated[bool, typer.Option(help="Cell-centred canonical crop at training and inference.")]
Colour = Annotated[
    str,
    typer.Option(
        help="Colour normalisation at training and inference: none, white-balance, macenko (see wbcid.preprocess)."
    ),
]
Pretrained = Annotated[bool, typer.Option(help="Start from ImageNet weights.")]
FrozenBn = Annotated[bool, typer.Option(help="Keep ImageNet batch-norm statistics in every layer.")]
Precision = Annotated[
    str,
    typer.Option(
        help="fp32 or bf16: the frozen layers (no gradients) in bf16, and on a GPU the trained ones too (a CPU "
        "keeps those in fp32: slower in bf16, docs/precision.md); auto: bf16 on a GPU that supports it and, "
        "for train, on a CPU with bf16 units, else fp32 (bf16 is refused on a CPU without them). The run "
        "records what was used."
    ),
]
ServePrecision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Arithmetic of an ONNX model (the bundled one, a run's model.onnx, a `wbcid export`): fp32 (ONNX "
        "Runtime) or bf16 (OpenVINO on a CPU with bf16 units, faster; close calls and scores near the flag "
        "threshold are rechecked in fp32, so labels and flags agree with fp32); auto: bf16 for 512 or more images "
        "where it measures faster on this CPU (count: fp32, its calls are too small to gain).",
    ),
]
Weights = Annotated[Path | None, typer.Option(help="Local ImageNet weights file for the backbone.")]
DownloadWeights = Annotated[bool, typer.Option(help="Allow downloading ImageNet weights (timm:<name> backbones).")]
Epochs = Annotated[int, typer.Option(help="Maximum epochs (early stopping may end sooner).")]
AdaBN = Annotated[
    bool,
    typer.Option(
        "--adabn",
        "--adapt",
        help="Test-time AdaBN: re-estimate batch-norm statistics on these unlabelled images (one lab at a "
        "time; old name --adapt). Not `wbcid adapt`, which learns a lab from verified cells.",
    ),
]
Inputs = Annotated[list[Path], typer.Argument(help="Images or folders (searched recursively).")]
Tta = Annotated[
    bool | None,
    typer.Option(
        help="Average predictions over rotations and flips (8x slower); default: the model's own setting "
        "(on for models from `wbcid adapt`)."
    ),
]
ProtocolTta = Annotated[bool, typer.Option(help="Average predictions over rotations and flips (8x slower).")]


@contextmanager
def _interrupted(kept: str | Callable[[], str], resumable: bool = False) -> Iterator[None]:
    """Ctrl-C in a long command: say what was kept (and how to continue), instead of a traceback; so
    too, for a ``resumable`` one, where the file system stopped it (a full disk: the error alone did
    not say that the work done was kept)."""
    said = (lambda: kept) if isinstance(kept, str) else kept
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; {said()}.", err=True)
        raise typer.Exit(130) from None
    except OSError as exc:
        if not resumable:
            raise
        typer.echo(f"error: {exc}; {said()}.", err=True)
        raise typer.Exit(1) from None


def _resumable(kept: str, log: Path | None = None):
    """:func:`_interrupted` for a command that ``--resume`` continues; ``log``: the file its finished
    work is kept in, which an interruption in the first seconds (reading, loading) has not made yet."""

    def said() -> str:
        if log is not None and not log.exists():
            return "nothing was finished yet"
        return f"{kept}. Continue with the same command plus --resume"

    return _interrupted(said, resumable=True)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"wbcid {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Identify white blood cells in blood-smear images."""


@app.command()
def train(
    data: Data,
    out: Annotated[Path, typer.Option(help="Run directory to create (or continue with --resume).")],
    source: Sources = None,
    arch: Annotated[
        str,
        typer.Option(
            "--arch", "--model", help="Registered model (see `wbcid models`) or timm:<name> (--model is the old name)."
        ),
    ] = "efficientnet_lite0",
    epochs: Epochs = 6,
    batch_size: int = 32,
    lr: float = 2e-3,
    freeze: Annotated[
        str | None, typer.Option(help="none, backbone, or N leading layer groups; default: the model's.")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="Input size in pixels; default: the model's.")] = None,
    balanced: Annotated[bool, typer.Option(help="Class-weighted loss for skewed class counts.")] = False,
    augment: Augment = "domain",
    crop: Crop = True,
    colour: Colour = "none",
    frozen_bn: FrozenBn = False,
    precision: Precision = "auto",
    pretrained: Pretrained = True,
    weights: Weights = None,
    download_weights: DownloadWeights = False,
    patience: int = 3,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Train a classifier; writes the model, config, history and report to --out."""
    from .data import read_cells

    cells = read_cells(data, source)  # a wrong path fails in a second, before PyTorch is imported
    from .train import TrainConfig, fit

    config = TrainConfig(
        model=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        freeze=int(freeze) if freeze and freeze.isdigit() else freeze,
        input_size=input_size,
        pretrained=pretrained,
        weights=str(weights) if weights else None,
        download_weights=download_weights,
        balanced=balanced,
        patience=patience,
        augment=augment,
        crop=crop,
        colour=colour,
        frozen_bn=frozen_bn,
        precision=precision,
        seed=seed,
    )
    with _resumable("finished epochs are saved"):
        fit(cells, out, config, resume=resume)
    typer.echo(f"run written to {out} (report: {out / 'report.md'})")


@app.command()
def evaluate(
    data: Data,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, report.md and figures.")],
    model: ModelPath = None,
    source: Sources = None,
    split: Splits = None,
    adabn: AdaBN = False,
    tta: Tta = None,
    precision: ServePrecision = "auto",
) -> None:
    """Score a model on labelled images (any layout); writes metrics.json and report.md."""
    from .data import read_cells

    cells = read_cells(data, source, split)  # a wrong path fails before scikit-learn and the model load
    from .evaluation import evaluate as run_evaluation

    with _interrupted("nothing was written (the metrics need every cell)"):
        metrics = run_evaluation(model, cells, out, adabn=adabn, tta=tta, precision=precision)
    typer.echo(
        f"n={metrics['n']} accuracy={metrics['accuracy']:.4f} "
        f"balanced_accuracy={metrics['balanced_accuracy']:.4f} macro_f1={metrics['macro_f1']:.4f}"
    )
    if "flagged" in metrics and metrics["flagged"]["accuracy_unflagged"] is not None:
        f = metrics["flagged"]
        typer.echo(
            f"flagged={f['flagged']} ({f['flagged_share']:.1%}) accuracy_unflagged={f['accuracy_unflagged']:.4f}"
        )
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def predict(
    paths: Inputs,
    out: Annotated[Path, typer.Option(help="CSV to write.")],
    model: ModelPath = None,
    adabn: AdaBN = False,
    tta: Tta = None,
    precision: ServePrecision = "auto",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted prediction into --out.")] = False,
) -> None:
    """Classify images; writes one CSV row per image with all five class probabilities."""
    from .contract import flagged
    from .inference import predict as run_prediction
    from .inference import progress_log
    from .smear.differential import unfamiliar

    progress = progress_log(out)
    kept = (  # --adabn's statistics come from all the images at once: it keeps no log
        _interrupted(f"nothing was written to {out} (with --adabn the CSV is written once, at the end)")
        if adabn
        else _resumable(f"the images classified so far are kept in {progress}", progress)
    )
    with kept:
        table = run_prediction(model, paths, out, adabn=adabn, tta=tta, precision=precision, resume=resume)
    counts = table["label"].replace("", "(unreadable)").value_counts()
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))
    if table["flagged"].any():
        typer.echo(
            f"{int(table['flagged'].sum())} flagged as unlike the cells the model knows, unreadable, or grey, dark, "
            "blank or of several pages (columns 'flagged' and 'error'): check them by eye"
        )
    scored = table["ood_score"][(table["error"] == "") & table["ood_score"].notna()]
    if note := unfamiliar(int(flagged(scored).sum()), len(scored)):
        typer.echo(f"warning: {note}")
    typer.echo(f"predictions: {out}")


@app.command()
def count(
    paths: Inputs,
    out: Annotated[Path, typer.Option(help="Folder for counts.json, report.html and annotated images.")],
    model: ModelPath = None,
    cell_diameter: Annotated[
        float | None,
        typer.Option(
            help="Typical WBC diameter in pixels in these images (about 200 in 640x480 fields at 100x); "
            "default: measured from the red cells."
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help='Reference ranges JSON, {"neutrophil": [40, 75], ...}; default: adult ranges (see report).'),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted count in --out.")] = False,
    detector: Annotated[
        str,
        typer.Option(help="How WBCs are found: 'learned' (a network trained on annotated fields) or 'stain' (colour)."),
    ] = "learned",
    tta: Tta = None,
    precision: ServePrecision = "auto",
) -> None:
    """Find, classify and count the WBCs in smear fields: a differential with 95 % intervals, one per
    specimen (each subfolder of a folder of slides, or each of several folders given)."""
    from .files import COUNT_LOG
    from .smear.counting import count as run_count
    from .smear.differential import read_reference

    with _resumable(f"finished fields are in {out / COUNT_LOG}", out / COUNT_LOG):
        ranges = read_reference(reference) if reference else None
        result = run_count(model, paths, out, cell_diameter, ranges, resume, detector, tta, precision)
    specimens = result["specimens"]
    for name, specimen in specimens.items():
        scale = specimen["scale"]
        title = f"specimen {name}: " if len(specimens) > 1 else ""
        how = scale["how"] + (f"; the red cells say about {scale['measured']:.0f} px" if "measured" in scale else "")
        typer.echo(f"{title}scale: WBCs about {scale['cell_diameter']:.0f} px across ({how})")
        if len(specimens) > 1:
            _echo_differential(specimen["totals"], indent="  ")
    if len(specimens) > 1:
        typer.echo(f"all {len(specimens)} specimens together (per specimen: {out / 'specimens.csv'}):")
    _echo_differential(result["totals"])
    typer.echo(f"report: {out / 'report.html'}")


def _echo_differential(totals: dict, indent: str = "") -> None:
    """The terminal summary of one differential: counts, percentages with intervals, flags."""
    from .smear.specimens import cells_short

    typer.echo(
        f"{indent}{totals['detected']} WBCs found, {totals['counted']} counted, {totals['flagged']} flagged for review"
    )
    for name, c in totals["classes"].items():
        if c["percent"] is not None:
            flag = ""
            if c["flag"]:
                sure = "conclusive" if c["conclusive"] else "inconclusive: the interval overlaps the range"
                flag = f"  {c['flag'].upper()} ({sure}; reference {c['reference'][0]:g}-{c['reference'][1]:g} %)"
            typer.echo(
                f"{indent}  {name:11s} {c['count']:4d}  {c['percent']:5.1f} %  "
                f"[{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}]{flag}"
            )
    short = cells_short(totals)
    if short:
        typer.echo(f"{indent}warning: {short}")


@app.command()
def adapt(
    data: Annotated[
        list[Path],
        typer.Option(
            "--data",
            metavar="VERIFIED",
            help="Verified cells of the new lab: manifest CSV, ImageFolder, labels JSON, or a `wbcid review` export "
            "(repeatable).",
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Run directory to create (an ordinary model: count, predict, ... take it).")
    ],
    model: ModelPath = None,
    unlabelled: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="CELLS", help="Unlabelled cell images or folders from the same lab, for pseudo-labels (repeatable)."
        ),
    ] = None,
    replay: Annotated[
        Path | None,
        typer.Option(
            help="The base model's training data, replayed so it does not forget; default: the data it recorded."
        ),
    ] = None,
    trainable_groups: Annotated[
        int, typer.Option(help="Last backbone layer groups fine-tuned with the head (0: head only).")
    ] = 2,
    steps: Annotated[int, typer.Option(help="Optimisation steps (fixed budget).")] = 100,
    cross_fit: Annotated[
        bool,
        typer.Option(
            help="Set the flag threshold so ~5 % of the lab's other cells are flagged, measured on cells two "
            "half-models were not tuned on (3x the fine-tuning time); --no-cross-fit: calibrate on the verified "
            "cells themselves (flags more ordinary cells, and more non-WBCs)."
        ),
    ] = True,
    cross_fit_steps: Annotated[
        int | None,
        typer.Option(
            help="Steps of each cross-fitting half-model; default: --steps (fewer flag more: docs/adaptation.md)."
        ),
    ] = None,
    tta: Annotated[
        bool,
        typer.Option(
            help="The adapted model predicts over the 8 rotations and flips of each cell unless told not to "
            "(8x the network's time per cell; +0.010 macro-F1 on average over 40 measured draws: docs/adaptation.md)."
        ),
    ] = True,
    earlier: Annotated[
        bool,
        typer.Option(
            help="With --model a model that adapt made: adapt its base again, to the cells verified for it and these "
            "(measured better: docs/loop_rounds.md); --no-earlier: tune it further on these cells alone."
        ),
    ] = True,
    precision: Precision = "auto",
    seed: int = 0,
) -> None:
    """Learn a new lab from a few verified cells (few-shot fine-tuning with replay); writes a run directory."""
    from .data import read_all

    cells = read_all(data)  # a wrong path or label fails in a second, before PyTorch is imported
    from .adaptation import AdaptConfig
    from .adaptation import adapt as run_adaptation

    config = AdaptConfig(
        trainable_groups=trainable_groups,
        steps=steps,
        cross_fit=cross_fit,
        cross_fit_steps=cross_fit_steps,
        tta=tta,
        earlier=earlier,
        precision=precision,
        seed=seed,
    )
    with _interrupted("nothing was written; the base model is unchanged"):
        run = run_adaptation(cells, out, model, config, replay, unlabelled)
    record = json.loads((run / "config.json").read_text())
    per_class = ", ".join(f"{k} {v}" for k, v in record["verified_cells"].items())
    again = f"{record['base_model']} adapted again" if record["continued_from"] else "adapted"
    before = f", {record['earlier_cells']} of them verified for {model}" if record["earlier_cells"] else ""
    typer.echo(
        f"{again} to {sum(record['verified_cells'].values())} verified cells ({per_class}{before}) in "
        f"{record['seconds']:.0f} s; model: {run} (use it with --model {run})"
    )


@app.command()
def review(
    run: Annotated[Path, typer.Argument(help="Output of `wbcid count` (its folder) or `wbcid predict` (its CSV).")],
    port: Annotated[
        int | None, typer.Option(help="Port to serve on (0: any free port); default: 8765, or the next free one.")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but 127.0.0.1 exposes the review.")
    ] = "127.0.0.1",
    model: Annotated[
        Path | None,
        typer.Option(
            help="Model for the Grad-CAM maps (run directory or .pt); default: the one that made the count or CSV."
        ),
    ] = None,
    reviewer: Annotated[
        str | None, typer.Option(help="Name recorded with each correction; default: your user.")
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(help="Write the verified cells (ImageFolder + manifest.csv) and differential here, then exit."),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(help="Folder the run's images were moved to (laid out below it as before); kept for the review."),
    ] = None,
) -> None:
    """Verify a count in the browser: correct labels, keep every correction, export them for `wbcid adapt`."""
    from .web import ReviewStore, export_review, export_summary, serve

    if export is not None:
        typer.echo(export_summary(export_review(ReviewStore.open(run, images, writing=False), export)))
        return
    with _interrupted("every correction is saved in the review database"):
        serve(run, host, port, model, reviewer, images)


@app.command()
def explain(
    paths: Inputs,
    out: Annotated[Path, typer.Option(help="Folder for the Grad-CAM images.")],
    model: ModelPath = None,
) -> None:
    """Grad-CAM: show which part of each cell image decided the model's answer."""
    from .files import list_images

    files = list_images(paths)  # a wrong path fails in a second, before PyTorch is imported
    from .gradcam import explain as run_explain

    with _interrupted(f"the Grad-CAM images written so far are in {out}; the same command writes them all"):
        written = run_explain(model, files, out)
    typer.echo(f"wrote {len(written)} Grad-CAM image(s) to {out}")


@app.command()
def benchmark(
    data: Data,
    out: Annotated[Path, typer.Option(help="Folder for benchmark.json, report.md and the model.")],
    model: Annotated[Path | None, typer.Option(help="Evaluate this trained model instead of training one.")] = None,
    arch: Annotated[str, typer.Option(help="Architecture to train (see `wbcid models`).")] = "efficientnet_lite0",
    epochs: Epochs = 6,
    augment: Augment = "domain",
    crop: Crop = True,
    colour: Colour = "none",
    frozen_bn: FrozenBn = False,
    pretrained: Pretrained = True,
    weights: Weights = None,
    download_weights: DownloadWeights = False,
    adabn: AdaBN = False,
    tta: ProtocolTta = False,
    leave_one_out: Annotated[bool, typer.Option(help="Train on all sources but one, for each source.")] = False,
    holdout: Annotated[str | None, typer.Option(help="Train on all sources but this one; test on it.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted benchmark in --out.")] = False,
) -> None:
    """Cross-domain protocol: train on PBC, test on PBC and every other lab (with 95 % intervals)."""
    from .benchmark import benchmark_table, leave_one_source_out, run_benchmark
    from .train import TrainConfig

    if leave_one_out and (holdout or model):
        raise WbcidError(
            "--leave-one-out trains one model per source, each held out in turn: not with --holdout or --model"
        )
    config = TrainConfig(
        model=arch,
        epochs=epochs,
        augment=augment,
        crop=crop,
        colour=colour,
        frozen_bn=frozen_bn,
        pretrained=pretrained,
        weights=str(weights) if weights else None,
        download_weights=download_weights,
    )
    with _resumable(f"finished trainings and sources are kept in {out}"):
        if leave_one_out:
            summary = leave_one_source_out(data, out, config, adabn=adabn, tta=tta, resume=resume)
        else:
            summary = run_benchmark(
                data, out, config, model=model, holdout=holdout, adabn=adabn, tta=tta, resume=resume
            )
    typer.echo(benchmark_table(summary["sources"]))
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="ONNX file to write.")],
    model: ModelPath = None,
    check: Annotated[
        Path | None,
        typer.Option(
            help="Labelled data to compare ONNX Runtime with PyTorch on (label agreement, probability error)."
        ),
    ] = None,
) -> None:
    """Export a model to ONNX (preprocessing contract in its metadata); optionally check it."""
    from .data import read_cells
    from .export import export_onnx
    from .inference import agreement
    from .loading import resolve_model
    from .serving import OnnxModel

    cells = None if check is None else read_cells(check)  # wrong data fails before the export, not after it
    torch_model = resolve_model(model, needs_torch="export")
    export_onnx(torch_model, out)
    typer.echo(f"wrote {out}")
    if cells is not None:
        result = agreement(torch_model, OnnxModel(out), cells.paths)
        typer.echo(
            f"ONNX Runtime vs PyTorch on {result['images']} images: label agreement "
            f"{result['label_agreement']:.4f}, max probability difference {result['max_probability_difference']:.2e}"
        )


@app.command()
def models() -> None:
    """List the registered models."""
    from .models import list_models

    for spec in list_models():
        typer.echo(f"{spec.name:20s} {spec.input_size:4d}px  freeze={spec.freeze!s:9s} {spec.description}")
    typer.echo(f"{'timm:<name>':20s} any timm architecture (ImageNet weights with --download-weights or --weights)")


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def as_options(args: list[str]) -> list[str]:
    """``wbcid count out=counts/slide1 tta=false fields/``, as ultralytics' ``yolo train data=...``
    is written: each ``name=value`` that names an option of the command becomes ``--name value``
    (``--name`` or ``--no-name`` for a switch); anything else, a file named ``a=b.jpg`` included,
    is left as it is."""
    if not args or args[0].startswith("-") or not any("=" in arg for arg in args[1:]):  # nothing to rewrite
        return args
    command = typer.main.get_command(app).commands.get(args[0])
    if command is None:
        return args
    options = {o.removeprefix("--"): p for p in command.params for o in p.opts if o.startswith("--")}
    rewritten = args[:1]
    for arg in args[1:]:
        name, equals, value = arg.partition("=")
        option = options.get(name.replace("_", "-")) if equals and not arg.startswith("-") else None
        if option is None:
            rewritten.append(arg)
        elif not value:  # "out=" would be the current folder
            raise WbcidError(f"{arg}: give {name} a value")
        elif not option.is_flag:
            rewritten += [option.opts[0], value]
        elif value.lower() in TRUE:
            rewritten.append(option.opts[0])
        elif value.lower() in FALSE:
            rewritten += option.secondary_opts[:1]  # a switch without a --no- form is off unless given
        else:
            raise WbcidError(f"{arg}: {name} is a switch, true or false")
    return rewritten


def refuse_empty(args: list[str]) -> None:
    """An empty argument (``--out "$OUT"`` with ``OUT`` unset in a script) would name the current
    folder: ``count`` wrote its results there and ``wbcid count --out c "$FIELDS"`` counted every image
    in it. No option of wbcid takes an empty value, so one is always a slip."""
    if "" in args:
        at = args.index("")
        after = f" after {args[at - 1]}" if at else ""
        raise WbcidError(f"an empty argument{after} (an unset variable in a script?): it would name the current folder")


def main() -> None:
    """Entry point: user errors become one clear line and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # libraries: warnings only
    # PIL warns of a "decompression bomb DOS attack" from 89 Mpx: a stitched field that large counts as
    # it is, and from 179 Mpx PIL refuses and wbcid says why (decoding.unreadable_reason)
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    log.setLevel(logging.INFO)  # wbcid's own progress
    try:
        refuse_empty(sys.argv[1:])
        app(as_options(sys.argv[1:]))
    except WbcidError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except OSError as exc:  # the file system's answer (a full disk, no permission), not a defect of wbcid
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
