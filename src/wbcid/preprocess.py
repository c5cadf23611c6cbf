"""How an image becomes the network's input: framing, colour, size. The same at training and inference.

A :class:`Preprocess` is built from a model's config (:meth:`Preprocess.of`), so every path
that feeds a model (training, evaluation, prediction, counting, Grad-CAM, ONNX serving) repeats
exactly what training did.

Colour normalisation (``colour``):

* ``none``: pixels as the camera wrote them.
* ``white-balance``: white-patch colour constancy. In bright-field microscopy the brightest
  pixels are unstained background or plasma, i.e. the lamp seen through the camera, so
  dividing each channel by its 99th percentile removes the lab's illuminant and camera white
  balance (Tecom's yellow background becomes white) while every stain keeps its own colour,
  including the eosinophils' red. Per-image Reinhard or grey-world normalisation would instead
  map each image's mean colour to one target and erase that red.
* ``macenko``: white balance, then Macenko et al. (ISBI 2009) stain separation via torchstain:
  each image's two stain vectors and 99th-percentile concentrations are mapped onto a reference
  fitted on the training images (:func:`fit_stain_reference`, stored in the model config).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from .crop import canonical_crop
from .errors import WbcidError

if TYPE_CHECKING:
    import torch

    from .contract import ModelConfig

COLOURS = ("none", "white-balance", "macenko")
WHITE_PERCENTILE = 99.0  # robust "brightest pixels": ignores a few saturated or dust pixels
REFERENCE_SAMPLE = 200  # training images a Macenko reference is fitted on
CAMERA_BITS = (8, 10, 12, 14, 16)  # the depths cameras digitise at: see eight_bit
ORIENTATION = 0x0112  # the EXIF tag


def upright_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, turned as the camera's EXIF orientation says. Samples wider than 8 bits are scaled
    down, not clipped or cut to their high byte (see :func:`eight_bit`): PIL's ``convert("RGB")``
    turns a 16-bit grey image all white, and PIL reads a 16-bit colour TIFF or PNG by its high bytes
    alone, which leaves a camera's 12-bit data nearly black."""
    if (wide := _wide_colour(image)) is not None:
        orientation = image.getexif().get(ORIENTATION)
        image = Image.fromarray(eight_bit(wide))
        if orientation:
            image.getexif()[ORIENTATION] = orientation
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(eight_bit(np.asarray(image)))
    return image.convert("RGB")


def eight_bit(values: np.ndarray) -> np.ndarray:
    """Samples as uint8, divided by the top of the smallest depth a camera digitises at (8, 10, 12, 14
    or 16 bits) that their largest value fits in, or of [0, 1] for floats that fit there: a camera's
    12-bit data stored in 16-bit words keeps its brightness."""
    largest = float(values.max(initial=0))
    if values.dtype.kind == "f" and largest <= 1:
        top = 1.0
    else:
        top = 2.0 ** next((bits for bits in CAMERA_BITS if largest < 2**bits), CAMERA_BITS[-1]) - 1
    return (np.clip(values.astype(np.float32) / top, 0, 1) * 255).round().astype(np.uint8)


def _wide_colour(image: Image.Image) -> np.ndarray | None:
    """The samples of a colour TIFF or PNG stored with more than 8 bits each (PIL would keep only their
    high bytes), read whole; ``None`` for any other image."""
    if image.mode not in ("RGB", "RGBA"):
        return None
    if image.format == "TIFF" and (bits := max(image.tag_v2.get(258, (8,)))) > 8:
        read = _tiff_samples
    elif image.format == "PNG" and image.tile and str(image.tile[0].args).endswith(";16B"):
        bits, read = 16, _png_samples
    else:
        return None
    try:
        samples = read(image)
    except (ValueError, RuntimeError, KeyError) as exc:  # damaged data; a codec's failure; a codec missing
        raise OSError(f"cannot decode this {image.format}'s {bits}-bit samples: {exc}") from exc
    return samples[..., :3]


def _tiff_samples(image: Image.Image) -> np.ndarray:
    import tifffile  # scikit-image's own TIFF reader; imagecodecs gives it LZW, PackBits and the rest

    if not getattr(image, "filename", None):  # opened from a file object: tifffile reads from where it stands
        image.fp.seek(0)
    with tifffile.TiffFile(getattr(image, "filename", None) or image.fp) as tiff:
        page = tiff.pages[image.tell()]
        samples = page.asarray()
    return np.moveaxis(samples, 0, -1) if page.axes.startswith("S") else samples  # "S...": plane by plane


def _png_samples(image: Image.Image) -> np.ndarray:
    import imagecodecs

    image.fp.seek(0)
    return imagecodecs.png_decode(image.fp.read())


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """A decoded HWC uint8 image as the CHW uint8 tensor every batch is stacked from."""
    import torch  # here, not at the top: serving an ONNX model never imports PyTorch

    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # a copy: decoded arrays may be read-only


# PyTorch's CPU inference is faster on small batches than on the 64-128 images that callers read at
# once (a batch of 128 has activations far beyond the CPU caches; issue 14's note): they run in these.
TORCH_BATCH = 32


def as_input(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 NCHW images -> the network's float input in [0, 1], channels-last (fast for CPU convolutions)."""
    import torch

    return (images.to(device).float() / 255).contiguous(memory_format=torch.channels_last)


def white_balance(rgb: np.ndarray) -> np.ndarray:
    """Scale each channel so that its ``WHITE_PERCENTILE`` brightness becomes 255 (uint8 HWC in and out)."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    white = np.maximum(np.percentile(pixels, WHITE_PERCENTILE, axis=0), 1.0)
    return np.clip(rgb * (255.0 / white), 0, 255).astype(np.uint8)


def _macenko():
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    return NumpyMacenkoNormalizer()


def fit_stain_reference(images: Sequence[np.ndarray]) -> dict:
    """Median stain vectors and concentrations of white-balanced training images (Macenko's target)."""
    stains, maxima = [], []
    for rgb in images:
        normalizer = _macenko()
        try:
            normalizer.fit(white_balance(rgb), Io=255)
        except (np.linalg.LinAlgError, ValueError, IndexError):
            continue  # too few stained pixels to estimate two stains
        stains.append(normalizer.HERef)
        maxima.append(normalizer.maxCRef)
    if not stains:
        raise WbcidError("no training image had enough stained pixels to fit a Macenko stain reference")
    vectors = np.median(np.stack(stains), axis=0)
    return {
        "stains": (vectors / np.linalg.norm(vectors, axis=0)).tolist(),
        "max_concentration": np.median(np.stack(maxima), axis=0).tolist(),
    }


@dataclass(frozen=True)
class Preprocess:
    """Framing (canonical crop or whole image), colour normalisation and size for one model."""

    size: int
    crop: bool = False
    colour: str = "none"
    stain_reference: dict | None = None  # for ``macenko``: from :func:`fit_stain_reference`

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise WbcidError(f"colour normalisation must be one of {', '.join(COLOURS)}, not {self.colour!r}")
        if self.colour == "macenko" and self.stain_reference is None:
            raise WbcidError("macenko colour normalisation needs a stain reference (fit_stain_reference)")

    @classmethod
    def of(cls, config: ModelConfig) -> Preprocess:
        """The preprocessing a model was trained with."""
        return cls(config.input_size, config.crop, config.colour, config.stain_reference)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB ``size x size`` uint8 array (HWC) from any PIL image."""
        return self.frame(upright_rgb(image))

    def frame(self, image: Image.Image) -> np.ndarray:
        """:meth:`__call__` of an image :func:`upright_rgb` already made."""
        size = self.size
        framed = canonical_crop(image, size) if self.crop else image.resize((size, size), Image.Resampling.BILINEAR)
        return self.normalise(np.asarray(framed))

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        if self.colour == "none":
            return rgb
        balanced = white_balance(rgb)
        if self.colour == "white-balance":
            return balanced
        normalizer = _macenko()
        normalizer.HERef = np.asarray(self.stain_reference["stains"])
        normalizer.maxCRef = np.asarray(self.stain_reference["max_concentration"])
        try:
            with np.errstate(all="ignore"):
                out, _, _ = normalizer.normalize(balanced, Io=255, stains=False)
        except (np.linalg.LinAlgError, ValueError, IndexError):
            return balanced  # a nearly unstained image: nothing to separate
        return out
