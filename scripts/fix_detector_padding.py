"""Give a detector ONNX file exported before wbcid fixed its padding (the shipped one) fixed pads.

EfficientNet-Lite's strided convolutions pad TensorFlow's "same" way, by amounts computed from each
input's size. Exported before :func:`wbcid.export.torchscript_onnx` fixed them, that arithmetic stayed
in the graph (Shape, Ceil, Slice ... feeding four Pad nodes) and ONNX Runtime could not fold the
padding into the convolutions: the shipped detector ran 1.3x slower than its own network needs. The
detector's sides are multiples of 32 (:data:`wbcid.smear.learned.MULTIPLE`), where every strided
layer's input is even and its pads are the same at every size. This script reads each Pad's amounts
at many such sizes, checks that they are the same, writes them into the graph as constants, drops
the arithmetic nothing uses any more, and checks that the outputs are bit-identical to the old
file's before it replaces it. The weights are untouched: docs/detection.md and every count stay valid.

    python scripts/fix_detector_padding.py [src/wbcid/weights/wbc-detector.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from wbcid.smear.learned import MULTIPLE, WEIGHTS

SIDES = [MULTIPLE * k for k in range(1, 9)] + [MULTIPLE * 20]  # 32 ... 256 and 640 pixels


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def pad_amounts(model: onnx.ModelProto) -> list[list[int]]:
    """Each Pad node's amounts, the same at every input size in ``SIDES`` x ``SIDES`` (checked)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [node.input[1] for node in probe.graph.node if node.op_type == "Pad"]
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in names)
    session = _session(probe)
    seen = {
        tuple(tuple(p.tolist()) for p in session.run(names, {"image": np.zeros((1, 3, h, w), np.float32)}))
        for h in SIDES
        for w in SIDES
    }
    if len(seen) != 1:
        raise SystemExit(f"the pads change with the input size ({len(seen)} different sets): not fixable")
    return [list(p) for p in seen.pop()]


def fix_padding(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose Pad nodes take constant amounts, without the arithmetic that computed them."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    for node, amounts in zip([n for n in graph.node if n.op_type == "Pad"], pad_amounts(model)):
        graph.initializer.append(numpy_helper.from_array(np.array(amounts, np.int64), f"{node.name}/pads"))
        node.input[1] = f"{node.name}/pads"
    while True:  # drop nodes whose outputs nothing reads, until none is left
        used = {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not set(n.output) & (used | {o.name for o in graph.output})]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for unused in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(unused)
    onnx.checker.check_model(fixed)
    return fixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, nargs="?", default=WEIGHTS)
    path = parser.parse_args().path
    model = onnx.load(path)
    constants = {i.name for i in model.graph.initializer}
    if all(n.input[1] in constants for n in model.graph.node if n.op_type == "Pad"):
        raise SystemExit(f"{path}: its pads are fixed already")
    fixed = fix_padding(model)
    old, new = _session(model), _session(fixed)
    rng = np.random.default_rng(0)
    for h, w in [(MULTIPLE, MULTIPLE), (128, 160), (480, 640), (96, 224)]:
        x = rng.random((1, 3, h, w), dtype=np.float32)
        if not np.array_equal(old.run(None, {"image": x})[0], new.run(None, {"image": x})[0]):
            raise SystemExit(f"outputs differ at {h}x{w}: {path} left as it was")
    onnx.save(fixed, path)
    print(f"{path}: {len(model.graph.node)} -> {len(fixed.graph.node)} nodes, outputs bit-identical")


if __name__ == "__main__":
    main()
