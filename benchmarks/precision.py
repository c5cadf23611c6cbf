"""Lower precision on this CPU: bf16 training steps and an int8 ONNX model, against fp32.

    python benchmarks/precision.py [--data ../shared/data] [--steps 12] [--calibration-per-class 40]
                                   [--out docs/precision]

* Training: the default recipe's network step (EfficientNet-Lite0, 128 px, first 4 layer groups
  frozen, batch 32, AdamW) timed in fp32, with the frozen prefix in bf16 (it needs no gradient),
  and with the whole step under ``torch.autocast("cpu", dtype=torch.bfloat16)``; median of
  ``--steps`` steps after 2 warm-up steps, the three modes interleaved twice.
* Inference: the bundled ONNX model in ONNX Runtime fp32 (``wbcid --precision fp32``) against
  - the same model quantized with ONNX Runtime's static quantization (QDQ, per-channel int8
    weights, uint8 activations, convolutions only so the head and the OOD scorer stay fp32),
    calibrated on ``--calibration-per-class`` PBC *training* cells per class; once with every
    convolution quantized, once with the depthwise ones (and the first) left in fp32;
  - the same ONNX file run by OpenVINO in fp32 and with bf16 inference precision (AVX-512 BF16 or AMX,
    where the CPU has them), and as ``wbcid`` serves bf16 (:class:`wbcid.serving.OnnxModel` with ``precision="bf16"``:
    OpenVINO bf16, cells whose two best logits are closer than ``RECHECK_MARGIN`` or whose OOD
    score is within ``RECHECK_OOD`` (in log) of the flag threshold rerun in fp32).
  Each is compared with ONNX Runtime fp32 on PBC test and every other lab (label agreement,
  macro-F1, agreement of the flag) and on the OOD task (AUROC of ``ood_score``, PBC's non-WBC
  cells vs PBC test), and timed on one batch of 64 PBC training cells, 2 threads. The largest
  bf16-fp32 differences of the logits and of the log OOD score on ``--calibration-per-class`` PBC
  training cells per class are what ``RECHECK_MARGIN`` and ``RECHECK_OOD`` were set from.

Writes ``OUT.json`` and ``OUT.md`` (``--out``, default ``docs/precision``; another CPU's run goes
beside it under its own name). Run it with nothing else running.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from common import cpu_description, parser, setup, write_results
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.metrics import f1_score, roc_auc_score

from wbcid.benchmark import OTHER_SOURCES, TRAIN_SOURCE
from wbcid.contract import BUNDLED_ONNX, flagged
from wbcid.data import read_cells
from wbcid.decoding import load_images
from wbcid.loading import resolve_model
from wbcid.models import create_model
from wbcid.preprocess import Preprocess, as_input
from wbcid.serving import OUTPUTS, OnnxModel, bf16_missing, session
from wbcid.splits import sample_per_class


def training_steps(steps: int) -> dict[str, float]:
    """Median milliseconds per training step in each precision mode."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", freeze=4, input_size=128).to(memory_format=torch.channels_last)
    units, _ = model._units()
    frozen = next(i for i, u in enumerate(units) if any(p.requires_grad for p in u.parameters()))
    prefix, suffix = model.split(len(units) - frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    x = torch.rand(32, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (32,))
    model.train()

    def step(mode: str) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            h = prefix(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16 autocast"):
            loss = torch.nn.functional.cross_entropy(model.head(suffix(h.float())), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {}
    for mode in ["fp32", "bf16 frozen prefix", "bf16 autocast"] * 2:
        for i in range(steps + 2):
            start = time.perf_counter()
            step(mode)
            if i >= 2:
                times.setdefault(mode, []).append(1000 * (time.perf_counter() - start))
    return {mode: statistics.median(t) for mode, t in times.items()}


def quantize(source: Path, target: Path, calibration: torch.Tensor, skip_depthwise: bool = False) -> Path:
    """An int8 copy of ``source`` calibrated on ``calibration``; ``skip_depthwise``: those convolutions
    (and the first, which sees the raw image) stay fp32."""

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": as_input(b).contiguous().numpy()} for b in calibration.split(32)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    convolutions = [n for n in onnx.load(prepared).graph.node if n.op_type == "Conv"]
    depthwise = [n.name for n in convolutions if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv"],
        nodes_to_exclude=[convolutions[0].name, *depthwise] if skip_depthwise else None,
    )
    return target


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # a batch -> (logits, ood_score)


def runtimes(int8_paths: dict[str, Path]) -> dict[str, Runner]:
    """Every way of running the bundled model measured here, by name; the first is the reference."""

    def with_onnxruntime(path: Path) -> Runner:
        runtime = session(path, threads=2)  # on both cores
        return lambda x: tuple(runtime.run(OUTPUTS, {"image": x}))

    found = {"ONNX Runtime fp32": with_onnxruntime(BUNDLED_ONNX)}
    found |= {f"ONNX Runtime {name}": with_onnxruntime(path) for name, path in int8_paths.items()}
    if bf16_missing():
        return found
    found["wbcid bf16"] = OnnxModel(BUNDLED_ONNX, threads=2, precision="bf16").scores
    import openvino

    core = openvino.Core()
    for precision in ("f32", "bf16"):
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 2}
        request = core.compile_model(str(BUNDLED_ONNX), "CPU", config).create_infer_request()

        def run(x: np.ndarray, request=request) -> tuple[np.ndarray, np.ndarray]:
            out = request.infer({0: x})  # views of OpenVINO's buffers, overwritten by the next call
            return np.array(out["logits"]), np.array(out["ood_score"])

        found[f"OpenVINO {precision.replace('f32', 'fp32')}"] = run
    return found


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--steps", type=int, default=12)
    options.add_argument("--calibration-per-class", type=int, default=40)
    options.add_argument("--out", type=Path, default=Path("docs/precision"))
    args = options.parse_args()
    command = setup()
    torch.set_num_threads(2)
    result: dict = {"command": command, "training_step_ms": training_steps(args.steps)}

    fp32 = resolve_model(BUNDLED_ONNX)
    prep = Preprocess.of(fp32.config)
    cells = read_cells(args.data / "cells.csv", known_only=False)
    calibration, _ = load_images(
        sample_per_class(cells.select([TRAIN_SOURCE], ["train"]).known(), args.calibration_per_class), prep
    )
    result["calibration_cells"] = len(calibration)
    result["cpu"] = cpu_description()
    tmp = Path(tempfile.mkdtemp())
    int8 = {
        "int8": quantize(BUNDLED_ONNX, tmp / "int8.onnx", calibration),
        "int8 but depthwise": quantize(BUNDLED_ONNX, tmp / "int8_dw.onnx", calibration, skip_depthwise=True),
    }
    runners = runtimes(int8)
    reference = next(iter(runners))

    def run(runner: Runner, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = [runner(as_input(b).contiguous().numpy()) for b in images.split(64)]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    batch = calibration[:64]
    result["images_per_second_batch64"] = {}
    for name, runner in runners.items():
        run(runner, batch)
        start = time.perf_counter()
        for _ in range(10):
            run(runner, batch)
        result["images_per_second_batch64"][name] = 640 / (time.perf_counter() - start)

    if "wbcid bf16" in runners:  # what RECHECK_MARGIN was set from: training cells only
        (logits32, ood32), (logits16, ood16) = (
            run(runners[reference], calibration),
            run(runners["OpenVINO bf16"], calibration),
        )
        result["bf16_logit_error_on_training_cells"] = float(np.abs(logits16 - logits32).max())
        result["bf16_log_ood_error_on_training_cells"] = float(np.abs(np.log(ood16 / ood32)).max())

    scored = {}
    result["sources"] = {}
    for source in (TRAIN_SOURCE, *OTHER_SOURCES, "pbc_other"):
        subset = cells.select([source], ["test"] if source == TRAIN_SOURCE else None)
        subset = subset if source == "pbc_other" else subset.known()
        images, subset = load_images(subset, prep)
        scored[source] = {name: run(runner, images) for name, runner in runners.items()}
        if source == "pbc_other":
            continue
        labels = {name: logits.argmax(1) for name, (logits, _) in scored[source].items()}
        flags = {name: flagged(ood) for name, (_, ood) in scored[source].items()}
        if "wbcid bf16" in runners:  # a recomputed cell's logits are fp32's to the bit
            served = scored[source]["wbcid bf16"][0] == scored[source][reference][0]
            result.setdefault("rechecked_share", {})[source] = float(served.all(1).mean())
        result["sources"][source] = {
            "cells": len(subset),
            "label_agreement": {name: float((got == labels[reference]).mean()) for name, got in labels.items()},
            "flag_agreement": {name: float((got == flags[reference]).mean()) for name, got in flags.items()},
            "macro_f1": {name: float(f1_score(subset.labels, got, average="macro")) for name, got in labels.items()},
        }
    result["ood_auroc"] = {}
    for name in runners:
        inside, outside = scored[TRAIN_SOURCE][name][1], scored["pbc_other"][name][1]
        truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
        result["ood_auroc"][name] = float(roc_auc_score(truth, np.r_[inside, outside]))
    page = report(result)
    write_results(args.out, result, page)
    print(page)


def report(r: dict) -> str:
    steps = r["training_step_ms"]
    names = list(r["ood_auroc"])
    others = names[1:]

    def per_source(key: str) -> str:
        head = f"| source | cells | {' | '.join(names if key == 'macro_f1' else others)} |"
        rule = "|---|---:|" + "---:|" * len(names if key == "macro_f1" else others)
        rows = [
            f"| {s} | {v['cells']} | "
            + " | ".join(f"{v[key][n]:.4f}" for n in (names if key == "macro_f1" else others))
            + " |"
            for s, v in r["sources"].items()
        ]
        return "\n".join([head, rule, *rows])

    speed = " | ".join(f"{r['images_per_second_batch64'][n]:.0f}" for n in names)
    auroc = " | ".join(f"{r['ood_auroc'][n]:.4f}" for n in names)
    rechecked = ", ".join(f"{s} {v:.1%}" for s, v in r.get("rechecked_share", {}).items())
    served = (
        f"""
`wbcid bf16` is what `--precision bf16` (and `auto` from 512 images, where it measures faster) serves: OpenVINO bf16, with
every cell whose two best logits are closer than `RECHECK_MARGIN` (0.5), or whose OOD score is
within a factor exp(`RECHECK_OOD`) = exp(0.25) of the flag threshold, recomputed in fp32. Share of
cells recomputed: {rechecked}. The largest bf16-fp32 differences on the {r["calibration_cells"]}
PBC training cells: logits {r["bf16_logit_error_on_training_cells"]:.3f}, log OOD score
{r["bf16_log_ood_error_on_training_cells"]:.3f} (the two bands are 2.5x these, rounded).
"""
        if rechecked
        else ""
    )
    return f"""# Lower precision on this CPU: bf16 training, int8 and bf16 inference

Command: `{r["command"]}` (nothing else running). CPU: {r["cpu"]}. See the script's docstring
for what each number is.

## Training step (default recipe, batch 32, 128 px), median ms

| fp32 | bf16 frozen prefix | bf16 autocast (whole step) |
|---:|---:|---:|
| {steps["fp32"]:.0f} | {steps["bf16 frozen prefix"]:.0f} | {steps["bf16 autocast"]:.0f} |

## Inference: the bundled model run in lower precision, against {names[0]}

| | {" | ".join(names)} |
|---|{"---:|" * len(names)}
| images/s, batch 64, 2 threads | {speed} |
| OOD AUROC (PBC non-WBC cells vs PBC test) | {auroc} |
{served}
Label agreement with {names[0]}, per source:

{per_source("label_agreement")}

Agreement of the flag (OOD score above its threshold) with {names[0]}:

{per_source("flag_agreement")}

Macro-F1:

{per_source("macro_f1")}
"""


if __name__ == "__main__":
    main()
