"""How fast the review app is on a 1,000-cell run: gallery open in a real browser, corrections saved.

    python benchmarks/review.py [--cells 1000] [--data ../shared/data]

Builds the run once with ``wbcid predict`` (bundled model) on the first N lisc/tecom/cellavision/bccd
and PBC-test cells, starts ``wbcid review``'s app with uvicorn on 127.0.0.1, and measures:

* thumbnails cut at the first start (cached for later starts);
* gallery open: headless Chromium (Debian's) from navigation start until every tile is in the
  page and the differential is drawn, 5 loads (the first cold, then the browser's cache);
* a correction saved: ``PUT /api/cells/{id}`` round trip over HTTP (with the cell's version, as the
  page sends it; committed to SQLite), 200 times.

Writes docs/review.json and docs/review.md, and runs/review.png (a screenshot of the page; it shows
the data's cells, so it stays out of the repository).
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import uvicorn
from common import parser, setup, write_results
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from wbcid.benchmark import OTHER_SOURCES
from wbcid.inference import predict
from wbcid.web import ReviewStore, create_app


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--cells", type=int, default=1000)
    args = options.parse_args()
    command = setup()
    table = pd.read_csv(args.data / "cells.csv")
    table = pd.concat(
        [
            table[table.source.isin(OTHER_SOURCES)],
            table[(table.source == "pbc") & (table.split == "test")],
        ]
    ).head(args.cells)
    work = Path(tempfile.mkdtemp())
    predict(None, [args.data / p for p in table.path], work / "predictions.csv")
    started = time.perf_counter()
    made = ReviewStore.open(work / "predictions.csv").make_thumbnails()
    thumbnails = time.perf_counter() - started
    app = create_app(work / "predictions.csv", reviewer="benchmark")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/"

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    opens = []
    for _ in range(5):
        driver.get(url)
        WebDriverWait(driver, 60).until(
            lambda d: (
                len(d.find_elements(By.CSS_SELECTOR, ".tile")) == made
                and d.find_elements(By.CSS_SELECTOR, "#differential tbody tr")
            )
        )
        opens.append(driver.execute_script("return performance.now()") / 1000)
    Path("runs").mkdir(exist_ok=True)
    driver.save_screenshot("runs/review.png")
    driver.quit()

    cells = json.loads(urllib.request.urlopen(url + "api/cells").read())["cells"]
    labels = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "other"]
    saves = []
    for i in range(200):
        body = json.dumps({"label": labels[i % 6], "version": cells[i]["version"]}).encode()  # as the page sends it
        request = urllib.request.Request(
            f"{url}api/cells/{cells[i]['id']}", body, method="PUT", headers={"Content-Type": "application/json"}
        )
        t = time.perf_counter()
        urllib.request.urlopen(request).read()
        saves.append(time.perf_counter() - t)
    server.should_exit = True

    result = {
        "command": command,
        "cells": made,
        "thumbnails_first_start_s": round(thumbnails, 2),
        "gallery_open_s": [round(x, 3) for x in opens],
        "correction_ms": {
            "median": round(1000 * float(np.median(saves)), 1),
            "p95": round(1000 * float(np.percentile(saves, 95)), 1),
            "max": round(1000 * max(saves), 1),
        },
    }
    write_results(
        Path("docs/review"),
        result,
        f"""# The review app: speed

Command: `{result["command"]}` (this project's 2-core CPU machine, nothing else running).

| what | measured |
|---|---|
| cells in the run | {made} |
| thumbnails cut at the first start (then cached in the run) | {thumbnails:.1f} s |
| gallery open in headless Chromium (its default view, the review queue), navigation to every tile and the differential drawn (first load, then 4 reloads) | {", ".join(f"{x:.2f} s" for x in opens)} |
| a correction saved (`PUT /api/cells/{{id}}` with the version the page saw, committed to SQLite, HTTP round trip), 200 corrections | median {result["correction_ms"]["median"]} ms, 95th percentile {result["correction_ms"]["p95"]} ms, max {result["correction_ms"]["max"]} ms |

Thumbnails load lazily (`loading="lazy"`), so opening the gallery does not wait for 1,000
images. The benchmark saves a screenshot of the page to `runs/review.png`, outside the repository:
it shows the data's cells.
""",
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
