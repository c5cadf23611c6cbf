"""What did the model look at? Grad-CAM overlays (Selvaraju et al., ICCV 2017) via captum.

Grad-CAM weights the last convolution's feature maps by the gradient of the predicted class, so
it shows which parts of the cell drove the answer: the nucleus and granules should light up,
not the red cells or the background. It needs gradients, so it runs the PyTorch model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn

from .data import CLASSES
from .decoding import PROBLEMS, image_batches
from .errors import WbcidError
from .files import Inputs, list_images, output_folder, short_name
from .loading import describe_model, resolve_model
from .models import WBCNet
from .preprocess import Preprocess

log = logging.getLogger("wbcid")
MADE_BY = "wbcid model"  # PNG text: which model an image explains, so two models' images never share a folder


def last_conv(model: WBCNet) -> nn.Conv2d:
    """The backbone's last convolution: its maps are the most semantic that still have a layout."""
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise WbcidError(f"{model.config.model} has no convolution to explain")
    return convs[-1]


def grad_cam(model: WBCNet, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps in [0, 1] at input resolution ``(n, h, w)`` and the predicted classes, for uint8 NCHW images."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    x = images.float() / 255
    with torch.no_grad():
        predicted = model(x).argmax(1)
    cam = LayerGradCam(model, last_conv(model)).attribute(x, target=predicted, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0].detach()
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12)
    return (cam / peak[:, None, None]).clamp(0, 1).numpy(), predicted.numpy()


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with the heat map blended over it (jet colour map), beside the image itself."""
    from matplotlib import colormaps

    coloured = colormaps["jet"](heat)[..., :3] * 255
    blended = ((1 - alpha) * rgb + alpha * coloured).astype(np.uint8)
    return Image.fromarray(np.concatenate([rgb, blended], axis=1))


def explain(
    model: WBCNet | str | os.PathLike | None,
    paths: Inputs,
    out_dir: str | os.PathLike,
    size: int = 256,
) -> list[Path]:
    """Write ``<name>_gradcam.png`` (input as the model saw it | overlay) per image; unreadable ones are
    skipped, and an error says so when none was readable. A picture predict would flag for a problem
    (grey, dark, blank, several pages: :data:`wbcid.decoding.PROBLEMS`) is explained with a warning."""
    out_dir = output_folder(out_dir, "the Grad-CAM images")
    name = describe_model(model)
    if out_dir.is_dir() and (earlier := _made_by(out_dir)) not in (None, name):
        raise WbcidError(
            f"{out_dir} holds Grad-CAM images of another model ({earlier}); choose another --out (the two "
            "models' images would mix there: each name carries its model's answer)"
        )
    files = list_images(paths)
    model = resolve_model(model, needs_torch="Grad-CAM (it needs gradients)")
    made_by = PngInfo()
    made_by.add_text(MADE_BY, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for path, batch in zip(files, image_batches(files, Preprocess.of(model.config), batch_size=1)):
        if not batch.readable[0]:
            log.warning("%s: could not read the image, skipped", path)
            continue
        if problem := batch.problem[0]:
            log.warning("%s: %s", path, PROBLEMS[problem])
        heat, predicted = grad_cam(model, torch.from_numpy(batch.images))
        seen = batch.images[0].transpose(1, 2, 0)
        big = np.asarray(Image.fromarray(seen).resize((size, size), Image.Resampling.BILINEAR))
        heat_big = np.asarray(Image.fromarray((heat[0] * 255).astype(np.uint8)).resize((size, size))) / 255
        stem = short_name(Path(path).stem)
        stem = stem if stem not in used else short_name(f"{Path(path).parent.name}_{Path(path).stem}")
        while stem in used:  # two inputs with one name never share an output file
            stem += "_"
        used.add(stem)
        target = out_dir / f"{stem}_gradcam_{CLASSES[int(predicted[0])]}.png"
        overlay(big, heat_big).save(target, pnginfo=made_by)
        written.append(target)
    if not written:
        raise WbcidError(f"none of the {len(files)} images could be read")
    return written


def _made_by(out_dir: Path) -> str | None:
    """The model whose Grad-CAM images ``out_dir`` holds (as written in each PNG), or None if it holds none;
    an image without the record is another model's for all we know."""
    earlier = next(out_dir.glob("*_gradcam_*.png"), None)
    if earlier is None:
        return None
    with Image.open(earlier) as image:
        return getattr(image, "text", {}).get(MADE_BY, "not recorded")
