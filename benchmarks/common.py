"""What every benchmark shares: the data option, logging, the exact command, and writing results.

Benchmarks are scripts (``python benchmarks/NAME.py``); each writes its numbers as JSON and a
Markdown page under docs/, with the command that produced them, so anyone can rerun it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from wbcid.data import default_data_root


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


def write_results(stem: Path, result: dict, markdown: str | None = None) -> None:
    """``STEM.json`` (the numbers) and, if given, ``STEM.md`` (the page)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    if markdown is not None:
        stem.with_suffix(".md").write_text(markdown.rstrip() + "\n")
