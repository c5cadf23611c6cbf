"""Test-time adaptation: use the unlabelled images of a new lab, never its labels.

* AdaBN (Li et al., 2016): batch-norm layers re-estimate their feature statistics on the new
  lab's images, so features are normalised as they were for the training lab. Plain AdaBN
  assumes each layer's running statistics are those of the training data; that is false for
  layers frozen at their ImageNet statistics. So training also records every BN layer's input
  statistics on the training images (``source_statistics``), and adaptation maps the new lab's
  statistics onto those: ``x -> (x - mu_T) / s_T * s_S + mu_S`` folded into the layer. On the
  training lab itself this is the identity; where the statistics are missing it is plain AdaBN.
  It needs a batch of images from one lab (a folder, a slide, a test set), not one cell.

Test-time augmentation (the eight rotations and flips) is :func:`wbcid.inference.predict_scores`'
``tta``: it needs no PyTorch, so ONNX models have it too.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .preprocess import as_input

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]
log = logging.getLogger("wbcid")


def _norm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


# Images per batch when BN statistics are gathered, of the training cells and of a new lab alike: the
# default training batch, whose statistics the BN layers normalised with while the model learned.
STATISTICS_BATCH = 32
# At most this many images (64 batches) are drawn. Chosen on PBC (docs/bn_statistics.md): the statistics
# of 2,048 random training cells differ from those of all 7,200 about as much as those of PBC's own
# test cells do (99th percentile over channels: 0.014 against 0.011 standard deviations in the mean),
# ten or more times less than a new lab's (0.155-0.247); training records them in 10 s instead of 33 s.
STATISTICS_CELLS = 2048


@torch.no_grad()
def batchnorm_statistics(
    model: nn.Module, images: torch.Tensor, batch_size: int = STATISTICS_BATCH, cells: int = STATISTICS_CELLS
) -> Statistics:
    """Mean and variance of every BN layer's input over uint8 NCHW ``images`` (at most ``cells`` of
    them, drawn at random), as AdaBN sees them.

    Each BN layer normalises with its batch statistics while they are averaged over all batches
    (``momentum=None``); the model passed in is not changed. The batches draw the images in a fixed
    random order: files are often sorted by class, and batches of one class record within-class
    statistics (and let the class order of an evaluation's files leak into its result).
    """
    probe = copy.deepcopy(model).eval()
    norms = _norm_layers(probe)
    for bn in norms.values():
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:cells]
    for batch in order.split(batch_size) if len(images) else ():
        probe(as_input(images[batch]))
    return {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in norms.items()}


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose BN layers normalise ``images``' lab as they did the training lab.

    Uses ``model.source_statistics`` when training recorded them (see module docstring), else
    plain AdaBN. Only running means and variances change; learned weights stay as they are.
    """
    if len(images) < STATISTICS_BATCH:  # e.g. `wbcid predict --adabn` on one cell: its own statistics
        log.warning(
            "AdaBN on %d image(s), fewer than one batch of %d (the batches the model normalised with while it "
            "learned): the lab's statistics come out noisy; pass a folder, a slide or a test set of one lab",
            len(images),
            STATISTICS_BATCH,
        )
    target = batchnorm_statistics(model, images)
    source: Statistics | None = getattr(model, "source_statistics", None)
    adapted = copy.deepcopy(model).eval()
    for name, bn in _norm_layers(adapted).items():
        mean_t, var_t = target[name]
        if source is None:
            bn.running_mean.copy_(mean_t)
            bn.running_var.copy_(var_t)
            continue
        mean_s, var_s = source[name]
        ratio = (var_t + bn.eps) / (var_s + bn.eps)  # exact with the eps BN adds to the variance
        bn.running_mean.copy_(mean_t - ratio.sqrt() * (mean_s - bn.running_mean))
        bn.running_var.copy_(ratio * (bn.running_var + bn.eps) - bn.eps)
    return adapted
