"""Training-time augmentation, applied to whole batches with per-sample random parameters.

Runs on the in-memory uint8 batch after it is scaled to [0, 1] (kornia draws parameters per
sample, so a batch costs one vectorised call instead of a PIL pipeline per image). Cells have
no preferred orientation, hence full rotations and flips.

Policies: ``basic`` (geometry and mild colour) and ``domain``, which also imitates what
changes between labs: stain concentrations (jitter in haematoxylin-eosin-DAB optical-density
space, Tellez et al. 2018), camera colour and white balance (strong hue/saturation/brightness),
focus (blur), sensor noise and magnification (scale jitter). ``domain+lowres`` adds camera
resolution (down- and up-sampling by up to 4x).
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torch import nn
from torch.nn import functional as F

from .errors import WbcidError

POLICIES = ("none", "basic", "domain", "domain+lowres")


class RandomStainJitter(nn.Module):
    """Scale and shift each stain's optical density per sample: ``s' = s * a + b``."""

    def __init__(self, sigma: float = 0.05, bias: float = 0.05):
        super().__init__()
        self.sigma, self.bias = sigma, bias
        self.register_buffer("to_hed", torch.tensor(hed_from_rgb, dtype=torch.float32), persistent=False)
        self.register_buffer("to_rgb", torch.tensor(rgb_from_hed, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        density = -torch.log(x.clamp(min=1 / 255)).permute(0, 2, 3, 1)  # N H W 3
        stains = density @ self.to_hed
        scale = 1 + self.sigma * (2 * torch.rand(n, 1, 1, 3, device=x.device) - 1)
        shift = self.bias * (2 * torch.rand(n, 1, 1, 3, device=x.device) - 1)
        density = (stains * scale + shift) @ self.to_rgb
        return torch.exp(-density).clamp(0, 1).permute(0, 3, 1, 2)


class RandomLowResolution(nn.Module):
    """Down-sample by a random factor up to ``max_factor`` and back: a coarser camera or lower magnification.

    Blur alone keeps the pixel grid; a lab that images cells at a quarter of PBC's resolution
    (BCCD's 640x480 fields) loses the detail for good, and upsampling cannot bring it back.
    """

    def __init__(self, max_factor: float = 4.0, p: float = 0.3):
        super().__init__()
        self.max_factor, self.p = max_factor, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        out = x.clone()
        for i in (torch.rand(len(x)) < self.p).nonzero().flatten().tolist():
            factor = 1 + (self.max_factor - 1) * torch.rand(()).item()
            small = F.interpolate(
                x[i : i + 1],
                size=(max(8, round(height / factor)), max(8, round(width / factor))),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            out[i] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]
        return out


def train_augmentation(policy: str = "domain") -> nn.Module:
    """The augmentation for a policy (see :data:`POLICIES`) on [0, 1] NCHW batches."""
    if policy not in POLICIES:
        raise WbcidError(f"augmentation policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if policy == "none":
        return nn.Identity()
    geometry = [K.RandomHorizontalFlip(), K.RandomVerticalFlip()]
    if policy == "basic":
        return nn.Sequential(
            *geometry,
            K.RandomAffine(degrees=180, translate=(0.05, 0.05), scale=(0.9, 1.1), padding_mode="reflection", p=1.0),
            K.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02, p=0.8),
        )
    return nn.Sequential(
        *geometry,
        K.RandomAffine(degrees=180, translate=(0.05, 0.05), scale=(0.8, 1.25), padding_mode="reflection", p=1.0),
        RandomStainJitter(sigma=0.1, bias=0.05),
        K.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.1, p=0.9),
        *([RandomLowResolution(max_factor=4.0, p=0.3)] if policy == "domain+lowres" else []),
        K.RandomGaussianBlur((5, 5), sigma=(0.1, 2.0), p=0.3),
        K.RandomGaussianNoise(std=0.02, p=0.2),
    )
