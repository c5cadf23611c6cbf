"""Training: one readable loop with validation, early stopping, checkpoints and exact resume.

Images are decoded once into memory (every epoch reads all of them), augmented per batch, and
the run directory receives everything needed to use or continue the run:

``model.pt`` (best validation macro-F1), ``last.pt`` (resume point, written every epoch),
``model.onnx`` (the best model exported, what predict and count serve), ``config.json``,
``history.csv``, ``history.png``, ``val/`` (metrics of the best model), ``report.md``.

Every epoch seeds its own shuffling, augmentation and dropout from ``seed + epoch``, so a run
resumed after an interruption ends with the same weights as one that never stopped.

Launched by ``torchrun --nproc_per_node N -m wbcid train ...`` the same loop runs data-parallel
(PyTorch DDP; gloo on CPU, NCCL on GPUs): each process trains on its share of every epoch's
shuffled order, gradients are averaged, and all processes hold identical weights, so they
validate identically and stop together; only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .augment import train_augmentation
from .contract import FEWEST_CALIBRATION, PRECISIONS, QUANTILE, Freeze
from .data import CLASSES, CellSet, read_cells, training_record
from .decoding import load_images, try_decode
from .errors import WbcidError
from .evaluation import compute_metrics
from .files import output_folder
from .inference import predict_scores
from .models import WBCNet, create_model, read_saved, save_model
from .preprocess import REFERENCE_SAMPLE, Preprocess, fit_stain_reference
from .reports import plot_history, write_evaluation_report, write_run_report
from .serving import NO_BF16_UNITS
from .splits import split_train_val
from .training_statistics import record_training_statistics

log = logging.getLogger("wbcid")


@dataclass
class TrainConfig:
    """Everything that decides the trained model; saved in the run directory."""

    model: str = "efficientnet_lite0"
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    freeze: Freeze | None = None  # None: the model's default (see `wbcid models`)
    input_size: int | None = None  # None: the model's default
    pretrained: bool = True
    weights: str | None = None
    download_weights: bool = False
    balanced: bool = False  # class-weighted loss, for skewed class counts
    label_smoothing: float = 0.1
    patience: int = 3  # epochs without a better validation macro-F1 before stopping
    val_fraction: float = 0.15  # used when the data has no 'val' split
    augment: str = "domain"  # none, basic, domain: see wbcid.augment
    crop: bool = True  # cell-centred canonical crop (wbcid.crop), at training and inference
    colour: str = "none"  # colour normalisation at training and inference: see wbcid.preprocess
    frozen_bn: bool = False  # keep every batch-norm layer's ImageNet statistics while fine-tuning
    precision: str = "auto"  # auto, fp32 or bf16 (see autocast); the run records what auto chose
    seed: int = 0
    data: dict = field(default_factory=dict)  # provenance, filled in by fit()

    def __post_init__(self) -> None:
        """Every option checked before any image is decoded."""
        bad = [f"{k}={getattr(self, k)!r}" for k in ("epochs", "batch_size", "patience") if getattr(self, k) < 1]
        bad += [f"{k}={getattr(self, k)!r}" for k in ("lr", "weight_decay") if not getattr(self, k) >= 0]
        if not 0 < self.val_fraction < 1:
            bad.append(f"val_fraction={self.val_fraction!r}")
        if not 0 <= self.label_smoothing < 1:
            bad.append(f"label_smoothing={self.label_smoothing!r}")
        if self.input_size is not None and self.input_size < 16:
            bad.append(f"input_size={self.input_size!r}")
        bad += precision_problems(self.precision)
        if bad:
            raise WbcidError(
                f"invalid training options: {', '.join(bad)} (counts must be >= 1, rates >= 0, "
                "fractions between 0 and 1)"
            )
        if self.weights is not None and not Path(self.weights).is_file():
            raise WbcidError(f"no ImageNet weights file at {self.weights} (--weights)")
        train_augmentation(self.augment)  # a bad policy fails here, as in AdaptConfig


def precision_problems(precision: str) -> list[str]:
    """What is wrong with a ``precision`` option, for a config's list of invalid settings."""
    return [] if precision in PRECISIONS else [f"precision={precision!r} (one of {', '.join(PRECISIONS)})"]


def resolve_precision(precision: str, device: torch.device, cpu_bf16: bool = False) -> str:
    """What ``auto`` means on ``device``: bf16 on a GPU that supports it; on a CPU, bf16 only where
    the caller has frozen layers to run in it (``cpu_bf16``: training, whose frozen layer groups see
    new augmented images every step) and the CPU has bf16 units, else fp32. See :func:`autocast`.
    ``bf16`` asked of a CPU without bf16 units is refused: emulated, it would only be slower.
    """
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise WbcidError(f"--precision bf16: {NO_BF16_UNITS}; use --precision fp32")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16 and cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated, slower."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(precision: str, device: torch.device, trained: bool = True) -> torch.autocast:
    """The autocast context for a resolved ``precision``: bf16 for layers without gradients
    (``trained=False``), and for trained layers on a GPU only. On both CPUs this project has run
    on, bf16 made the trained layers' step slower (their depthwise convolutions' backward; an AMD
    EPYC with AVX-512 BF16: 216 against 189 ms for the whole step in bf16), while bf16 in the
    frozen layers alone made it faster (153 ms; docs/precision.md)."""
    enabled = precision == "bf16" and (not trained or device.type != "cpu")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class FrozenPrefix(nn.Module):
    """``model`` as a training step runs it: the frozen layer groups without gradients (and in bf16
    under ``precision="bf16"``), the rest with them. Weights and buffers are ``model``'s own, and
    ``train()`` is ``model``'s, so its frozen layers keep their batch-norm statistics."""

    def __init__(self, model: WBCNet, precision: str):
        super().__init__()
        self.model, self.precision = model, precision
        self.frozen, self.trained = model.split_frozen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.precision, x.device, trained=False):
            x = self.frozen(x)
        with autocast(self.precision, x.device):
            return self.model.head(self.trained(x.float()))

    def train(self, mode: bool = True) -> FrozenPrefix:
        self.training = mode
        self.model.train(mode)
        return self


def check_classes(train: CellSet) -> None:
    """Stop before training when a class has no training image: the model could never predict it. A
    lab's few verified cells, some types missing (basophils are rare), are what ``adapt`` learns from."""
    counts = train.class_counts()
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        data = train.origin if train.origin and Path(train.origin).exists() else "DATA"  # not merged from several
        raise WbcidError(
            f"{train.origin}: no training images of {', '.join(empty)} "
            f"(counts: {', '.join(f'{k} {v}' for k, v in counts.items())}); every class needs examples. To "
            f"learn your lab from a few verified cells, some types missing, adapt the pretrained model to them: "
            f"`wbcid adapt --data {data} --out RUN`"
        )


def fit(
    cells: CellSet | str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train on ``cells`` (split into train/val; or any ``--data`` path, as :func:`wbcid.read_cells`
    reads it) and write the run directory; returns it.

    ``resume=True`` continues from ``out_dir/last.pt`` with the configuration saved there; a run that
    finished is returned as it is, and one stopped before its first epoch ended is started.
    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is on disk.
    """
    out = Path(out_dir)
    if resume and (out / "report.md").is_file():  # written last: redoing the run's end would only cost minutes
        log.info("%s finished already (its report.md is written last): nothing to resume", out)
        return out
    if resume and not (out / "last.pt").exists() and not (out.is_dir() and any(out.iterdir())):
        log.info("%s holds no finished epoch to resume (stopped before the first ended?): starting the run", out)
        resume = False
    if not resume:  # checked before the processes of a data-parallel run meet, so before any of them writes
        if (out / "last.pt").exists():
            raise WbcidError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        output_folder(out, "the run", run=True)
    cells = cells if isinstance(cells, CellSet) else read_cells(cells)
    rank, world, device = _distributed()
    checkpoint = _load_checkpoint(out) if resume else None
    if checkpoint is not None:
        config = TrainConfig(**checkpoint["train_config"])
    config = replace(config or TrainConfig())  # a copy: the caller's config is never changed
    config.precision = resolve_precision(config.precision, device, cpu_bf16=True)
    writer = rank == 0

    model, train_set, val_set = _prepare(cells, config)
    prep = Preprocess.of(model.config)
    train_images, train_set = load_images(train_set, prep, "decoding train images")
    val_images, val_set = load_images(val_set, prep, "decoding validation images")
    config.data = {
        "origin": cells.origin,
        "train": train_set.class_counts(),
        "val": val_set.class_counts(),
        "skipped": dict(train_set.skipped),
        "processes": world,
    }
    log.info(
        "training %s on %d images, validating on %d (%d process(es), %s)",
        config.model,
        len(train_set),
        len(val_set),
        world,
        device,
    )
    if len(val_set) < FEWEST_CALIBRATION:  # 10 verified cells trained from ImageNet validated on one, unsaid
        log.warning(
            "validating on %d cell(s): the best epoch and the flag threshold (the %d %% quantile of their OOD "
            "scores, which needs at least %d) rest on too few; a lab's few verified cells are what `wbcid adapt` "
            "learns from, starting from a model that knows WBCs",
            len(val_set),
            round(100 * QUANTILE),
            FEWEST_CALIBRATION,
        )

    model = model.to(device, memory_format=torch.channels_last)
    step_model = FrozenPrefix(model, config.precision)
    net = nn.parallel.DistributedDataParallel(step_model) if world > 1 else step_model
    steps = len(shard(torch.arange(len(train_set)), config.batch_size, rank, world))
    optimizer, scheduler = _optimiser(model, config, steps_per_epoch=steps)
    weights = _class_weights(train_set.labels).to(device) if config.balanced else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    augment = train_augmentation(config.augment).to(device)
    state = {"epoch": 0, "history": [], "best": -1.0, "stale": 0}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = checkpoint["state"]
        log.info("resuming %s after epoch %d", out, state["epoch"])

    labels = torch.from_numpy(train_set.labels).to(device)
    while state["epoch"] < config.epochs and state["stale"] < config.patience:
        epoch = state["epoch"] + 1
        torch.manual_seed(config.seed + epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed + epoch))
        batches = shard(order, config.batch_size, rank, world)
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None if writer else True)
        totals = train_one_epoch(net, bar, train_images, labels, augment, loss_fn, optimizer, scheduler)
        if world > 1:
            torch.distributed.all_reduce(totals)
        record = {
            "epoch": epoch,
            "train_loss": (totals[0] / totals[2]).item(),
            "train_accuracy": (totals[1] / totals[2]).item(),
            **validate(model, val_images, val_set.labels),
            "lr": scheduler.get_last_lr()[0],
        }
        improved = _update_state(state, record)
        if not writer:
            continue
        if state["epoch"] == 1 and checkpoint is None:  # the folder comes with the first checkpoint: data refused,
            out.mkdir(parents=True, exist_ok=True)  # or a first epoch interrupted, leave nothing that blocks a rerun
            _write_json(out / "config.json", {"train": asdict(config), "model": model.config.to_dict()})
        save_checkpoints(model, out, config, optimizer, scheduler, state, improved)
        log.info(
            "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f",
            epoch,
            record["train_loss"],
            record["train_accuracy"],
            record["val_loss"],
            record["val_accuracy"],
            record["val_macro_f1"],
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    if writer:
        _finish_run(out, state["history"], train_images, train_set, val_images, val_set)
    if world > 1:
        torch.distributed.barrier()  # nobody returns before rank 0 has written the run
        torch.distributed.destroy_process_group()
    return out


def _prepare(cells: CellSet, config: TrainConfig) -> tuple[WBCNet, CellSet, CellSet]:
    """The untrained model with its preprocessing contract, and the train/validation split;
    everything that can refuse the data or the options does so here, before any image is decoded."""
    torch.manual_seed(config.seed)  # the new head's (or a scratch model's) initial weights
    model = create_model(
        config.model, config.pretrained, config.weights, config.download_weights, config.freeze, config.input_size
    )
    train_set, val_set = split_train_val(cells, config.val_fraction, config.seed)
    check_classes(train_set)
    stain_reference = None
    if config.colour == "macenko":
        framing = Preprocess(model.config.input_size, config.crop)
        stain_reference = _stain_reference(train_set, framing, config.seed)
    model.config = replace(
        model.config,
        crop=config.crop,
        colour=config.colour,
        frozen_bn=config.frozen_bn,
        stain_reference=stain_reference,
        training_data=training_record(train_set.cells + val_set.cells, cells.origin),
    )
    Preprocess.of(model.config)  # checks the colour option
    return model, train_set, val_set


def shard(order: torch.Tensor, batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """This process's batches of an epoch's ``order``: global batches of ``batch_size * world`` cells,
    each split evenly across the processes. One data-parallel step therefore sees exactly the cells of
    one single-process step with ``batch_size * world``; the few cells beyond a multiple of ``world``
    wait for the next epoch's order, so every process takes the same number of equal steps."""
    usable = order[: len(order) // world * world]
    return [batch.tensor_split(world)[rank] for batch in usable.split(batch_size * world)]


def _optimiser(
    model: WBCNet, config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW on the trainable parameters with a one-cycle schedule over the whole run."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    return optimizer, scheduler


def train_one_epoch(
    net: nn.Module,
    batches: Iterable[torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    augment: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> torch.Tensor:
    """One pass over ``batches`` (index tensors into the uint8 ``images``); returns
    (loss sum, correct, seen) as float64 so processes can add them up. ``net`` chooses its own
    arithmetic (:class:`FrozenPrefix`); the loss is computed in fp32."""
    net.train()
    device = labels.device
    totals = torch.zeros(3, dtype=torch.float64)
    for idx in batches:
        with torch.no_grad():
            x = augment(images[idx].to(device).float() / 255).contiguous(memory_format=torch.channels_last)
        logits = net(x)
        loss = loss_fn(logits.float(), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        totals += torch.tensor([loss.item() * len(idx), (logits.argmax(1) == labels[idx]).sum().item(), len(idx)])
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", acc=f"{totals[1] / totals[2]:.3f}")
    return totals


def validate(model: WBCNet, images: torch.Tensor, labels: np.ndarray) -> dict:
    """Validation loss, accuracy and macro-F1 (what early stopping and model.pt follow)."""
    logits = torch.from_numpy(predict_scores(model, images.split(128))[0])
    metrics = compute_metrics(labels, logits.argmax(1).numpy())
    return {
        "val_loss": nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item(),
        "val_accuracy": metrics["accuracy"],
        "val_macro_f1": metrics["macro_f1"],
    }


def _update_state(state: dict, record: dict) -> bool:
    """Append the epoch to the history and follow early stopping; True if it is the best so far."""
    state["history"].append(record)
    state["epoch"] = record["epoch"]
    improved = record["val_macro_f1"] > state["best"]
    state["best"], state["stale"] = (record["val_macro_f1"], 0) if improved else (state["best"], state["stale"] + 1)
    return improved


def save_checkpoints(
    model: WBCNet,
    out: Path,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
    improved: bool,
) -> None:
    """``model.pt`` when the epoch is the best so far; ``last.pt`` (everything resume needs) always."""
    if improved:
        save_model(model, out / "model.pt", epoch=state["epoch"], val_macro_f1=state["best"])
    save_model(
        model,
        out / "last.pt",
        train_config=asdict(config),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        state=state,
    )


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world == 1:
        return 0, 1, device
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world, device


def _finish_run(
    out: Path,
    history: list[dict],
    train_images: torch.Tensor,
    train_set: CellSet,
    val_images: torch.Tensor,
    val_set: CellSet,
) -> None:
    """Training statistics (adaptation, OOD), the ONNX export that serves the run, history,
    validation metrics of the best model, report."""
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    plot_history(history, out / "history.png")
    best, val_features = record_training_statistics(out / "model.pt", train_images, train_set, val_images)
    with torch.inference_mode():
        val = compute_metrics(val_set.labels, best.head(val_features).argmax(1).numpy())
    (out / "val").mkdir(exist_ok=True)
    _write_json(out / "val" / "metrics.json", val)
    write_evaluation_report(val, out / "val", "Validation (best epoch)")
    write_run_report(out, json.loads((out / "config.json").read_text()), val)


def _stain_reference(train_set: CellSet, framing: Preprocess, seed: int) -> dict:
    """Macenko's target stains, fitted on a fixed random sample of the framed training images."""
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(train_set), min(REFERENCE_SAMPLE, len(train_set)), replace=False)
    images = [try_decode(train_set.paths[i], framing) for i in sample]
    return fit_stain_reference([image for image in images if image is not None])


def _class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over present classes), as in scikit-learn's 'balanced'."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(float)
    weights = np.where(counts > 0, len(labels) / (len(CLASSES) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _load_checkpoint(out: Path) -> dict:
    path = out / "last.pt"
    if not path.is_file():
        raise WbcidError(f"nothing to resume: {path} does not exist")
    return read_saved(path)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))
