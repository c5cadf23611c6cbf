"""The settings that decide an adaptation (saved in the run directory)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..augment import train_augmentation
from ..errors import WbcidError
from ..train import precision_problems, resolve_precision

QUANTILE_METHODS = ("linear", "weibull")  # numpy.quantile's default, and rank p (n + 1) (Hyndman and Fan's type 6)


@dataclass(frozen=True)
class AdaptConfig:
    """Everything that decides an adaptation; saved in the run directory."""

    trainable_groups: int = 2  # last backbone layer groups fine-tuned with the head; 0 = head only
    steps: int = 100
    batch_size: int = 64  # half new-lab views, half replay
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    views: int = 16  # augmented views of each verified cell (the first is the cell as it is)
    pseudo_views: int = 2  # views of each pseudo-labelled cell
    replay_per_class: int = 100  # training cells of each class replayed
    replay_views: int = 2
    augment: str = "domain"
    cross_fit: bool = True  # calibrate the new lab's flag threshold on cells a half-model was not tuned on
    cross_fit_steps: int | None = None  # steps of each cross-fitting half-model; None: ``steps``
    # numpy's method for the cross-fitted scores' 95th percentile; "weibull" (rank 0.95 (n + 1)) was measured
    # and not adopted: it halved the non-WBCs flagged (docs/adaptation.md, musts-weibull)
    cross_fit_quantile: str = "linear"
    precision: str = "auto"  # fp32 or bf16 as in training (wbcid.train.autocast); auto: fp32 on a CPU (little to gain)
    tta: bool = True  # the adapted model predicts over rotations and flips by default (+0.010 macro-F1, 40 draws)
    earlier: bool = True  # an adapted base: adapt its own base again, to its verified cells and the new ones
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "cross_fit_steps", "batch_size", "views", "pseudo_views", "replay_views")
        bad = [f"{name}={value!r}" for name in positive if (value := getattr(self, name)) is not None and value < 1]
        bad += [
            f"{name}={getattr(self, name)!r}"
            for name in ("lr", "weight_decay", "replay_per_class", "trainable_groups")
            if getattr(self, name) < 0
        ]
        if not 0 <= self.label_smoothing < 1:
            bad.append(f"label_smoothing={self.label_smoothing!r}")
        bad += precision_problems(self.precision)
        if self.cross_fit_quantile not in QUANTILE_METHODS:
            bad.append(f"cross_fit_quantile={self.cross_fit_quantile!r} (one of {', '.join(QUANTILE_METHODS)})")
        if bad:
            raise WbcidError(f"invalid adaptation settings: {', '.join(bad)} (counts must be >= 1, rates >= 0)")
        train_augmentation(self.augment)  # a bad policy fails here, before any work

    @property
    def resolved_precision(self) -> str:
        """``precision`` with ``auto`` resolved as on the CPU (fp32 there) wherever the steps run: one
        rule for the replay cache, the fine-tuning and the config the run records."""
        return resolve_precision(self.precision, torch.device("cpu"))
