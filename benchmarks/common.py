"""What every benchmark shares: the data option, logging, the exact command, and writing results.

Benchmarks are scripts (``python benchmarks/NAME.py``); each writes its numbers as JSON and a
Markdown page under docs/, with the command that produced them, so anyone can rerun it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import pandas as pd

from wbcid.data import default_data_root
from wbcid.smear.detect import read_voc_boxes, read_yolo_boxes
from wbcid.smear.scale import annotated_rbc_diameter


def parser(doc: str | None, data: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as help and ``--data`` (default: the shared data folder)."""
    parsed = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if data:
        parsed.add_argument(
            "--data",
            type=Path,
            default=default_data_root(),
            help="data folder (default: $WBCID_DATA or ../shared/data)",
        )
    return parsed


def setup(level: int = logging.INFO) -> str:
    """Configure logging; returns the command as typed (what the docs quote), paths relative to here."""
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    return command()


def command() -> str:
    return shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def cpu_description() -> str:
    """The CPU a benchmark ran on, with the instruction sets low precision depends on: the machine
    behind this project changes between sessions, so every page says which one it measured."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = {"avx512_vnni": "AVX-512 VNNI", "avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX"}
    present = [label for flag, label in units.items() if flag in flags]
    missing = [label for flag, label in units.items() if flag not in flags]
    return f"{name or 'unknown CPU'}, {os.cpu_count()} cores; has {', '.join(present) or 'none of'}" + (
        f" (not {', '.join(missing)})" if missing else ""
    )


def write_results(stem: Path, result: dict, markdown: str | None = None) -> None:
    """``STEM.json`` (the numbers) and, if given, ``STEM.md`` (the page)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    if markdown is not None:
        stem.with_suffix(".md").write_text(markdown.rstrip() + "\n")


def yolo_boxes(path: Path, width: int, height: int) -> tuple[list[tuple[int, int, int, int]], float]:
    """(WBC boxes in pixels, the annotated red-cell diameter) of a YOLO label file."""
    wbc = [tuple(int(round(v)) for v in box) for box in read_yolo_boxes(path, (width, height), 0)]
    return wbc, annotated_rbc_diameter(read_yolo_boxes(path, (width, height), 1), (width, height))


def voc_boxes(path: Path, width: int, height: int) -> tuple[list[tuple[int, int, int, int]], float]:
    """:func:`yolo_boxes` for a Pascal VOC annotation file."""
    return read_voc_boxes(path, "WBC"), annotated_rbc_diameter(read_voc_boxes(path, "RBC"), (width, height))


def smear_sources(data: Path):
    """``(source, [(image path, width, height, label file, boxes function, split)])`` for each TXL-PBC lab
    and BCCD (VOC).

    ``split`` is TXL-PBC's own train / val / test. A BCCD (VOC) field has the split of the identical
    TXL-PBC file (TXL's bccd fields are BCCD's pictures, byte for byte), or ``none`` where TXL-PBC
    left it out; the learned detector trained on TXL's train split must not be scored on those.
    """
    root = data / "smears" / "txl_pbc"
    fields = pd.read_csv(root / "fields.csv")
    for source, group in fields.groupby("source"):
        yield (
            source,
            [
                (
                    root / "images" / r.image,
                    r.width,
                    r.height,
                    root / "labels" / f"{Path(r.image).stem}.txt",
                    yolo_boxes,
                    r.split,
                )
                for r in group.itertuples()
            ],
        )
    txl_split = {_md5(root / "images" / r.image): r.split for r in fields[fields.source == "bccd"].itertuples()}
    bccd = data / "smears" / "bccd"
    yield (
        "bccd (VOC)",
        [
            (p, 640, 480, bccd / "annotations" / f"{p.stem}.xml", voc_boxes, txl_split.get(_md5(p), "none"))
            for p in sorted((bccd / "images").glob("*.jpg"))
        ],
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
