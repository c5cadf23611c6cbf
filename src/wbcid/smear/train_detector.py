"""Training the learned WBC detector (:mod:`wbcid.smear.learned`) on fields with annotated boxes.

The network is EfficientNet-Lite0's ImageNet stem and first five stages (to stride 16), a small
feature pyramid back to stride 4 and CenterNet's heads (Zhou et al. 2019): a centre heat map
for WBCs and one for red cells (focal loss on Gaussian peaks), the box size in WBC diameters and
the centre's sub-cell offset (L1 at the centres, shared by both classes). Every field is first
resized by its own scale, as ``wbcid count`` will resize it: the WBC diameter expected from the
annotated red cells (:func:`wbcid.smear.scale.wbc_diameter`). Augmentation: that scale jittered
by up to 40 % either way (an estimate's error), flips and quarter turns, a random gain per colour channel (a camera's
white balance, a lamp's colour) and the colour part of the classifier's ``domain`` policy (stain,
camera colour, blur, noise). A cell cut by a training crop's edge stays a cell, boxed where it is
visible, as the annotators boxed cells cut by a field's border: otherwise the network learns that
cut cells are not cells, and misses them at the border of real fields.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ..errors import WbcidError
from ..export import torchscript_onnx
from .detect import read_yolo_boxes
from .learned import MAX_JITTER, MULTIPLE, RBC, STRIDE, WBC, WORK_DIAMETER
from .scale import annotated_rbc_diameter, wbc_diameter

CROP = 160  # side of the square training crops, in work pixels (3 WBCs; most fields fit whole)
MIN_VISIBLE = WORK_DIAMETER / 8  # TXL-PBC's annotators boxed slivers of cut cells down to about this
WHITE_BALANCE = (0.6, 1.0)  # range of the random gain of each colour channel


@dataclass(frozen=True)
class DetectorConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass
class Field:
    """One annotated field: the RGB image at ``MAX_JITTER`` times the work scale, and its boxes there."""

    image: np.ndarray
    boxes: np.ndarray  # (n, 4) x0 y0 x1 y1
    classes: np.ndarray  # (n,) WBC or RBC


def txl_fields(root: str | Path, sources: list[str] | None = None, splits: list[str] | None = None) -> list[Field]:
    """TXL-PBC's fields (``smears/txl_pbc``: YOLO labels, class 0 WBC, 1 RBC), each resized by its
    annotated scale."""
    root = Path(root)
    table = pd.read_csv(root / "fields.csv")
    if sources:
        table = table[table.source.isin(sources)]
    if splits:
        table = table[table.split.isin(splits)]
    if table.empty:
        raise WbcidError(f"no fields in {root / 'fields.csv'} for sources {sources} and splits {splits}")
    fields = []
    for row in table.itertuples():
        size = (row.width, row.height)
        labels = root / "labels" / f"{Path(row.image).stem}.txt"
        # TXL-PBC's YOLO classes 0 and 1 are WBC and RBC, the network's score channels
        boxes = {c: read_yolo_boxes(labels, size, c) for c in (WBC, RBC)}
        rbc = annotated_rbc_diameter(boxes[RBC], size)
        if not math.isfinite(rbc):
            continue  # no whole red cell: the field's scale is unknown
        scale = MAX_JITTER * WORK_DIAMETER / wbc_diameter(rbc)
        with Image.open(root / "images" / row.image) as image:
            work = image.convert("RGB").resize((round(row.width * scale), round(row.height * scale)), Image.BILINEAR)
        scaled = [np.array(boxes[c], np.float32).reshape(-1, 4) * scale for c in (WBC, RBC)]
        classes = np.repeat([WBC, RBC], [len(b) for b in scaled])
        fields.append(Field(np.asarray(work), np.concatenate(scaled), classes))
    return fields


class CenterNet(nn.Module):
    """Input: RGB in [0, 1], sides a multiple of 32. Output: WBC and RBC scores (sigmoid), width, height,
    x and y offset."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        import timm

        from ..models import efficientnet_lite_imagenet

        lite = efficientnet_lite_imagenet(0) if pretrained else timm.create_model("tf_efficientnet_lite0")
        self.stem = nn.Sequential(lite.conv_stem, lite.bn1, *lite.blocks[:2])  # stride 4, 24 channels
        self.mid = lite.blocks[2]  # stride 8, 40
        self.deep = nn.Sequential(*lite.blocks[3:5])  # stride 16, 112
        width = 64
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (24, 40, 112))
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, 6, 1))
        self.head[-1].bias.data[:2] = -math.log((1 - 0.01) / 0.01)  # start at a 1 % score (focal-loss prior)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        c4 = self.stem((x - self.mean) / self.std)
        c8 = self.mid(c4)
        c16 = self.deep(c8)
        p8 = self.lateral[1](c8) + F.interpolate(self.lateral[2](c16), scale_factor=2.0, mode="nearest")
        p4 = self.lateral[0](c4) + F.interpolate(p8, scale_factor=2.0, mode="nearest")
        return self.head(p4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.raw(x)
        return torch.cat([out[:, :2].sigmoid(), out[:, 2:]], 1)


def _targets(boxes: np.ndarray, classes: np.ndarray, side: int) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """The Gaussian heat maps (one per class) and ``(y, x, [w, h, dx, dy])`` regression targets of one
    crop's boxes."""
    cells = side // STRIDE
    heat = np.zeros((2, cells, cells), np.float32)
    ys, xs = np.mgrid[:cells, :cells]
    regress = []
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        ix, iy = int(cx), int(cy)
        if not (0 <= ix < cells and 0 <= iy < cells):
            continue
        sigma = max(x1 - x0, y1 - y0) / STRIDE / 6
        heat[c] = np.maximum(heat[c], np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2)))
        size = np.array([(x1 - x0) / WORK_DIAMETER, (y1 - y0) / WORK_DIAMETER, cx - ix, cy - iy], np.float32)
        regress.append((iy, ix, size))
    return heat, regress


def _sample(field: Field, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented ``CROP`` x ``CROP`` crop (HWC uint8, zero-padded), its boxes and their classes."""
    zoom = math.exp(rng.uniform(-math.log(MAX_JITTER), math.log(MAX_JITTER))) / MAX_JITTER
    height, width = field.image.shape[:2]
    size = (max(1, round(width * zoom)), max(1, round(height * zoom)))
    image = np.asarray(Image.fromarray(field.image).resize(size, Image.BILINEAR))
    boxes = field.boxes * zoom
    x = rng.integers(min(0, size[0] - CROP), max(0, size[0] - CROP) + 1)
    y = rng.integers(min(0, size[1] - CROP), max(0, size[1] - CROP) + 1)
    crop = np.zeros((CROP, CROP, 3), np.uint8)
    src = image[max(0, y) : y + CROP, max(0, x) : x + CROP]
    crop[max(0, -y) : max(0, -y) + src.shape[0], max(0, -x) : max(0, -x) + src.shape[1]] = src
    boxes = np.clip(boxes - [x, y, x, y], 0, CROP)  # a cell cut by the crop is boxed as at a field's border
    visible = (boxes[:, 2:] - boxes[:, :2] >= MIN_VISIBLE).all(1)
    boxes, classes = boxes[visible], field.classes[visible]
    if rng.random() < 0.5:  # another camera's white balance or lamp
        crop = (crop * rng.uniform(*WHITE_BALANCE, size=3)).astype(np.uint8)
    if rng.random() < 0.5:
        crop, boxes = crop[:, ::-1], np.c_[CROP - boxes[:, 2], boxes[:, 1], CROP - boxes[:, 0], boxes[:, 3]]
    for _ in range(rng.integers(4)):  # quarter turns anticlockwise: (x, y) -> (y, CROP - x)
        crop, boxes = np.rot90(crop), np.c_[boxes[:, 1], CROP - boxes[:, 2], boxes[:, 3], CROP - boxes[:, 0]]
    return np.ascontiguousarray(crop), boxes, classes


def _loss(out: torch.Tensor, heat: torch.Tensor, regress: list[list[tuple[int, int, np.ndarray]]]) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the heat map plus L1 on sizes and offsets at the centres."""
    p = out[:, :2].sigmoid().clamp(1e-4, 1 - 1e-4)
    peak = heat.eq(1).float()
    focal = -(peak * (1 - p) ** 2 * p.log() + (1 - peak) * (1 - heat) ** 4 * p**2 * (1 - p).log()).sum()
    where = [(i, y, x) for i, items in enumerate(regress) for y, x, _ in items]
    n = max(1, len(where))
    if not where:
        return focal / n
    index = torch.tensor(where)
    predicted = out[index[:, 0], 2:, index[:, 1], index[:, 2]]
    target = torch.from_numpy(np.stack([t for items in regress for *_, t in items]))
    return focal / n + F.l1_loss(predicted, target, reduction="sum") / n


def train_detector(fields: list[Field], config: DetectorConfig | None = None, pretrained: bool = True) -> CenterNet:
    """A CenterNet trained on ``fields`` (see :func:`txl_fields`)."""
    from tqdm.auto import tqdm

    from ..augment import train_augmentation

    config = config or DetectorConfig()
    if not fields:
        raise WbcidError("no annotated fields to train the detector on")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = CenterNet(pretrained).to(memory_format=torch.channels_last)
    colour = nn.Sequential(*list(train_augmentation("domain"))[3:])  # after flips and the affine: colour only
    steps_per_epoch = max(1, len(fields) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total, pct_start=0.1)
    model.train()
    progress = tqdm(range(total), desc="training the detector", unit="step", leave=False)
    for step in progress:
        if step % steps_per_epoch == 0:
            order = rng.permutation(len(fields))
        first = (step % steps_per_epoch) * config.batch_size
        batch = [_sample(fields[i], rng) for i in order[first : first + config.batch_size]]
        x = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).float() / 255
        targets = [_targets(boxes, classes, CROP) for _, boxes, classes in batch]
        with torch.no_grad():
            x = colour(x).contiguous(memory_format=torch.channels_last)
        loss = _loss(model.raw(x), torch.from_numpy(np.stack([t[0] for t in targets])), [t[1] for t in targets])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def export_detector(model: CenterNet, path: str | Path) -> Path:
    """Write ``model`` as ONNX with free input height and width (multiples of 32)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx = torchscript_onnx(
        copy.deepcopy(model.eval()),  # its padding is fixed for the export; the model stays as it is
        torch.rand(1, 3, MULTIPLE * 6, MULTIPLE * 5),
        ["image"],
        ["boxes"],
        {"image": {0: "batch", 2: "height", 3: "width"}, "boxes": {0: "batch", 2: "rows", 3: "columns"}},
    )
    path.write_bytes(onnx)
    return path
