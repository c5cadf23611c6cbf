"""End to end in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
correct one cell with the keyboard and one with a click, reload, and see both and the new differential;
walk the review queue, switch to the by-type view, and find it kept after a reload; read why an
export or a Grad-CAM view the server cannot make is missing, why a cell shows no picture, and why a
label was not saved over another reviewer's; read the API docs offline.

Never skipped: `.ci/run` installs the browser where it is missing. Nothing is downloaded: the
driver and browser paths are given, so Selenium Manager is never asked.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from wbcid.contract import BUNDLED_ONNX
from wbcid.smear.counting import count
from wbcid.web import ReviewStore, create_app
from wbcid.web.store import LABELS

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def server(data_root: Path, tmp_path: Path, request):
    """The app over a fresh count of copies of four BCCD fields (a test may delete one); ``indirect``
    parametrisation passes a ``--model``."""
    (tmp_path / "fields").mkdir()
    fields = [
        Path(shutil.copy(f, tmp_path / "fields")) for f in sorted((data_root / "smears/bccd/images").glob("*.jpg"))[:4]
    ]
    run = tmp_path / "run"
    count(None, fields, run)
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(run, model=getattr(request, "param", None), reviewer="browser")
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", run
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser():
    assert CHROMIUM and DRIVER, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def _settled(driver, read):
    """``read(driver)`` once the page holds still: the app redraws the table and tiles after each save,
    so an element found a moment ago may be gone (stale) when its text is read."""
    return WebDriverWait(driver, 20, ignored_exceptions=[StaleElementReferenceException]).until(read)


def _tiles(driver) -> list:
    return _settled(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".tile") or False)


def _tile_ids(driver) -> list[str]:
    """The tiles' cell ids in page order, read in one settled pass (tiles found first may be redrawn)."""
    return _settled(
        driver, lambda d: [t.get_attribute("data-id") for t in d.find_elements(By.CSS_SELECTOR, ".tile")] or False
    )


def _row(driver, label: str) -> list[str]:
    return _settled(
        driver,
        lambda d: (
            [td.text for td in d.find_elements(By.CSS_SELECTOR, f'#differential tr[data-type="{label}"] td')] or False
        ),
    )


def test_keyboard_and_click_corrections_survive_a_reload(server, browser, tmp_path: Path):
    url, run = server
    browser.get(url)
    first = _tile_ids(browser)[0]
    basophils = int(_row(browser, "basophil")[1])
    # keyboard: the first cell is selected on load; "5" makes it a basophil
    said, cell = browser.find_element(By.ID, "selected").text, ReviewStore.open(run).cell(int(first))
    assert "not yet verified" in said and cell["flagged"] and f"flagged ({cell['why']})" in said  # why to look
    tile = browser.find_element(By.CSS_SELECTOR, f'.tile[data-id="{first}"]')
    assert tile.get_attribute("title") == f"flagged: {cell['why']}"  # on every flagged tile, as it is pointed at
    browser.find_element(By.TAG_NAME, "body").send_keys("5")
    WebDriverWait(browser, 10).until(lambda d: "saved cell " + first in d.find_element(By.ID, "status").text)
    # click: select the last tile, then click the "other" button
    last_id = _tile_ids(browser)[-1]
    _settled(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'.tile[data-id="{last_id}"]').click() or True)
    browser.find_element(By.CSS_SELECTOR, '#buttons button[data-label="other"]').click()
    WebDriverWait(browser, 10).until(lambda d: "saved cell " + last_id in d.find_element(By.ID, "status").text)

    browser.refresh()
    captions = _settled(browser, lambda d: {t.get_attribute("data-id"): t.text for t in _tiles(d)})
    assert captions[first].startswith("\u2713 basophil")
    assert captions[last_id].startswith("\u2713 other")
    _settled(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'.tile[data-id="{first}"]').click() or True)
    assert "as basophil" in browser.find_element(By.ID, "selected").text
    assert int(_row(browser, "basophil")[1]) == basophils + 1
    assert "2 of" in browser.find_element(By.ID, "progress").text  # two verified
    store = ReviewStore.open(run)
    assert {c["id"]: c["label"] for c in store.cells() if c["reviewed"]} == {
        int(first): "basophil",
        int(last_id): "other",
    }
    (run / "verified").mkdir()  # a folder that is not an export is in the way: the page says so
    (run / "verified" / "notes.txt").write_text("a person's file")
    browser.find_element(By.ID, "export").click()
    WebDriverWait(browser, 10).until(lambda d: "not exported" in d.find_element(By.ID, "status").text)
    assert "409" in (said := browser.find_element(By.ID, "status").text) and "is not an earlier export" in said
    assert "move it aside, then export again" in said  # no folder to choose on the page
    shutil.rmtree(run / "verified")
    browser.find_element(By.ID, "export").click()  # the page says what the export holds: one cell to adapt to
    WebDriverWait(browser, 10).until(lambda d: "exported to" in d.find_element(By.ID, "status").text)
    said = browser.find_element(By.ID, "status").text
    assert "1 verified cell(s) of the five types exported" in said and "1 verified as not a WBC" in said
    browser.save_screenshot(str(tmp_path / "review.png"))


def _selected(driver) -> str:
    return _settled(driver, lambda d: d.find_element(By.CSS_SELECTOR, ".tile.selected").get_attribute("data-id"))


def _headings(driver) -> list[str]:
    return _settled(
        driver, lambda d: [h.text.rsplit(" (", 1)[0] for h in d.find_elements(By.CSS_SELECTOR, "#gallery h2")]
    )


def test_the_keys_walk_the_review_queue_or_the_types_and_the_view_is_kept(server, browser):
    url, run = server
    store = ReviewStore.open(run)
    queue = [str(c["id"]) for c in store.cells()]
    assert len(queue) >= 4 and len({c["label"] for c in store.cells()}) >= 2, "the fixture needs a mixed count"
    browser.get(url)
    # by default one list in the queue's order (flagged, then least confident), the first cell selected
    assert _tile_ids(browser) == queue
    assert _selected(browser) == queue[0]
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, "1")  # the queue's third cell: a neutrophil
    WebDriverWait(browser, 10).until(lambda d: "saved cell " + queue[2] in d.find_element(By.ID, "status").text)
    assert _selected(browser) == queue[3]

    body.send_keys("v")  # by type: groups in the five types' order, each in the queue's order; same cell selected
    WebDriverWait(browser, 10).until(lambda d: _headings(d)[0] in LABELS)
    labels = {str(c["id"]): c["label"] for c in store.cells()}
    order = _tile_ids(browser)
    expected = [i for name in LABELS for i in queue if labels[i] == name]
    assert order == expected
    assert _headings(browser) == [name for name in LABELS if name in labels.values()]
    assert _selected(browser) == queue[3]
    body.send_keys("u")  # undo finds the cell where this view put it, and selects it
    WebDriverWait(browser, 10).until(lambda d: _selected(d) == queue[2])
    assert not ReviewStore.open(run).cell(int(queue[2]))["reviewed"]
    assert _tile_ids(browser) == expected
    body.send_keys("1")
    WebDriverWait(browser, 10).until(lambda d: ReviewStore.open(run).cell(int(queue[2]))["reviewed"])

    browser.refresh()  # the view is kept; the first cell not yet verified is selected
    assert _tile_ids(browser) == expected
    assert _selected(browser) == next(i for i in expected if i != queue[2])
    Select(browser.find_element(By.ID, "view")).select_by_value("queue")  # the menu, as a mouse user would
    WebDriverWait(browser, 10).until(lambda d: _tile_ids(d) == queue)


def test_a_verified_cell_is_skipped_after_a_label_and_kept_by_enter(server, browser):
    """A second round shows the first round's cells verified among the rest: after a label the next cell
    was selected whatever it was, and Enter there replaced the person's label by the model's."""
    url, run = server
    store = ReviewStore.open(run)
    queue = [str(c["id"]) for c in store.cells()]
    earlier = store.cell(int(queue[1]))
    kept = next(name for name in LABELS if name != earlier["model_label"])
    store.set_label(earlier["id"], kept, reviewer="ana")  # verified in an earlier round
    browser.get(url)
    assert _selected(browser) == queue[0]
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("1")
    WebDriverWait(browser, 10).until(lambda d: "saved cell " + queue[0] in d.find_element(By.ID, "status").text)
    assert _selected(browser) == queue[2]  # ana's cell passed over
    body.send_keys(Keys.ARROW_LEFT, Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: "left as it is" in d.find_element(By.ID, "status").text)
    assert f"verified as {kept} by ana" in browser.find_element(By.ID, "status").text
    assert _selected(browser) == queue[2]
    after = ReviewStore.open(run).cell(earlier["id"])
    assert (after["label"], after["reviewer"], after["version"]) == (kept, "ana", 1)


@pytest.mark.parametrize("server", [BUNDLED_ONNX], indirect=True)
def test_a_view_the_server_cannot_make_says_why(server, browser):
    """Grad-CAM needs the PyTorch model: with an ONNX ``--model`` the picture stayed blank, unexplained."""
    url, _ = server
    browser.get(url)
    WebDriverWait(browser, 20).until(lambda d: "no Grad-CAM" in d.find_element(By.ID, "status").text)
    said = browser.find_element(By.ID, "status").text
    assert "409" in said and "Grad-CAM needs the PyTorch model" in said


def test_a_cell_whose_image_has_gone_says_so(server, browser):
    """A field moved or deleted after the count: its cells stay on the page, saying why they show nothing."""
    url, run = server
    first = ReviewStore.open(run).cells()[0]
    Path(first["image"]).unlink()
    browser.get(url)
    captions = _settled(browser, lambda d: {t.get_attribute("data-id"): t.text for t in _tiles(d)})
    assert captions[str(first["id"])].endswith("(image missing)")
    assert sum(c.endswith("(image missing)") for c in captions.values()) < len(captions)  # only that field's cells
    assert "not found there" in browser.find_element(By.ID, "selected").text  # the first cell, selected on load
    WebDriverWait(browser, 20).until(lambda d: "moved or deleted?" in d.find_element(By.ID, "status").text)
    warned = [p.text for p in browser.find_elements(By.CSS_SELECTOR, "p.warn")]  # not only in the server's log
    assert any(w.startswith("1 of the run's images are not where it records them") for w in warned)


def test_a_cell_someone_else_changed_is_not_overwritten(server, browser):
    """Two reviewers of one slide (or a page left open for a while): a label set on a page that had not
    seen the other's correction replaced it, and the audit trail was the only trace."""
    url, run = server
    browser.get(url)
    first = _tile_ids(browser)[0]  # selected on load, showing the model's call
    ReviewStore.open(run).set_label(int(first), "eosinophil", reviewer="ana")  # ana, on another page
    browser.find_element(By.TAG_NAME, "body").send_keys("5")
    WebDriverWait(browser, 10).until(lambda d: "not saved" in d.find_element(By.ID, "status").text)
    assert "now verified as eosinophil by ana" in browser.find_element(By.ID, "status").text
    caption = _settled(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'.tile[data-id="{first}"]').text)
    assert caption.startswith("\u2713 eosinophil")  # the page now shows ana's label, on the same cell
    assert _selected(browser) == first and ReviewStore.open(run).cell(int(first))["label"] == "eosinophil"
    browser.find_element(By.TAG_NAME, "body").send_keys("5")  # seen now: the reviewer may still change it
    WebDriverWait(browser, 10).until(lambda d: "saved cell " + first in d.find_element(By.ID, "status").text)
    assert ReviewStore.open(run).cell(int(first))["label"] == "basophil"


def test_the_api_docs_render_without_the_internet(server, browser):
    """/api/docs loaded Swagger UI from a CDN: on a lab's offline workstation (and here) it stayed blank."""
    url, _ = server
    browser.get(url + "api/docs")
    WebDriverWait(browser, 20).until(lambda d: "/api/cells/{cell_id}" in d.find_element(By.TAG_NAME, "body").text)
    assert "wbcid review" in browser.find_element(By.TAG_NAME, "body").text


def test_the_page_fits_a_tablet_and_a_phone(server, browser):
    """The two columns had fixed widths: on a tablet beside the microscope (820 px) the gallery was one
    tile wide, on a phone the page scrolled sideways and the label buttons were off screen."""
    url, _ = server
    browser.set_window_size(820, 1180)
    browser.get(url)
    tops = _settled(browser, lambda d: [t.rect["y"] for t in _tiles(d)[:3]] or False)
    assert len(tops) == 3 and len(set(tops)) == 1  # three tiles side by side
    width = "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    scroll, client = browser.execute_script(width)
    assert scroll <= client
    browser.set_window_size(390, 844)
    browser.refresh()
    last = _tile_ids(browser)[-1]

    def tap(d) -> bool:  # as a finger does: on the tile where it is seen, above the buttons
        tile = d.find_element(By.CSS_SELECTOR, f'.tile[data-id="{last}"]')
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", tile)
        tile.click()
        return True

    _settled(browser, tap)
    scroll, client = browser.execute_script(width)
    assert scroll <= client
    button = browser.find_element(By.CSS_SELECTOR, '#buttons button[data-label="lymphocyte"]')
    bottom = browser.execute_script("return arguments[0].getBoundingClientRect().bottom <= innerHeight", button)
    assert bottom  # at hand beside the last tile, at the far end of the page
    button.click()
    WebDriverWait(browser, 10).until(lambda d: "saved cell " + last in d.find_element(By.ID, "status").text)
    _, run = server

    def reviewed() -> bool:
        return {c["id"]: c["reviewed"] for c in ReviewStore.open(run).cells()}[int(last)]

    assert reviewed()
    browser.find_element(By.ID, "undo").click()  # no "u" key on a phone: a button does it
    WebDriverWait(browser, 10).until(lambda d: not reviewed())


def test_the_count_report_fits_a_phone(server, browser):
    """report.html had no viewport tag and a table and field images wider than a phone: the page
    scrolled sideways; now only its table does."""
    _, run = server
    browser.set_window_size(390, 844)
    browser.get((run / "report.html").as_uri())
    width = "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    scroll, client = _settled(browser, lambda d: d.execute_script(width))
    assert browser.find_elements(By.CSS_SELECTOR, "img.field") and scroll <= client
