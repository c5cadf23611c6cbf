"""The README's Python API snippet runs as written (on small real data instead of the full PBC set)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def test_exported_names_are_the_functions_not_modules():
    import wbcid.evaluation  # noqa: F401  (importing implementation modules first must not shadow the API)
    import wbcid.inference  # noqa: F401
    import wbcid.smear.counting  # noqa: F401
    from wbcid import adapt, count, evaluate, explain, fit, predict

    assert all(
        callable(f) and f.__class__.__name__ == "function" for f in (adapt, count, evaluate, explain, fit, predict)
    )


def test_one_folder_or_file_may_be_given_as_it_is(data_root: Path, tmp_path: Path):
    """``predict(None, "cells/")`` iterated the string: "no such file or folder: c"."""
    from wbcid import count, explain, predict

    folder = data_root / "cells/lisc/basophil"
    assert len(predict(None, str(folder))) == len(predict(None, [folder]))
    field = data_root / "smears/bccd/images/BloodImage_00000.jpg"
    assert count(None, str(field), tmp_path / "count")["totals"]["detected"] >= 1
    assert len(explain(None, folder / "Baoso_000.jpg", tmp_path / "gradcam")) == 1


@pytest.mark.slow
def test_readme_python_snippet_runs(pbc_small: Path, data_root: Path, tmp_path: Path, monkeypatch):
    snippet = re.search(r"### Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    fields = sorted((data_root / "smears/bccd/images").glob("*.jpg"))[:2]
    cells = sorted((data_root / "cells/lisc/eosinophil").glob("*.jpg"))[:4]
    for name, path in {"fields": fields, "my_cells": cells}.items():
        (tmp_path / name).mkdir()
        for f in path:
            (tmp_path / name / f.name).symlink_to(f)
    (tmp_path / "verified").mkdir()
    (tmp_path / "verified/manifest.csv").write_text("path,label\n" + "".join(f"{c},eosinophil\n" for c in cells))
    snippet = snippet.replace('"../shared/data/cells.csv"', repr(str(pbc_small)))
    snippet = snippet.replace("TrainConfig(epochs=6)", "TrainConfig(epochs=1, input_size=96)")
    quick = "config=AdaptConfig(steps=10, views=2, replay_per_class=10)"  # the defaults take a minute here
    snippet = snippet.replace("model=run)", f"model=run, {quick})").replace(
        "import TrainConfig,", "import AdaptConfig, TrainConfig,"
    )
    assert quick in snippet  # the README's adapt line is still the one the test shortens
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["metrics"]["n"] > 0 and len(namespace["table"]) == 4
    assert namespace["result"]["totals"]["detected"] >= 1
    assert (tmp_path / "runs/mylab/model.pt").is_file()
    assert namespace["model"].config.adaptation["cells"]["eosinophil"] == 4


def test_the_adapt_commands_defaults_are_the_python_apis():
    """The CLI spells its defaults out (importing the adaptation code would slow ``--help``); they must
    stay those of :class:`AdaptConfig`, or the command and the measured API would differ."""
    from dataclasses import asdict

    import typer

    from wbcid.adaptation import AdaptConfig
    from wbcid.cli import app

    options = {p.name: p.default for p in typer.main.get_command(app).commands["adapt"].params}
    defaults = asdict(AdaptConfig())
    shared = {name: options[name] for name in defaults if name in options}
    assert len(shared) >= 6 and shared == {name: defaults[name] for name in shared}
