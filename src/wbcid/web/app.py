"""The review web application: a technologist verifies a count's cells in the browser.

The page (``GET /``) is one Jinja2 template and a little plain JavaScript over this HTTP API:

* ``GET /api/cells`` -> ``{"cells": [...]}`` (review-queue order: flagged, then least confident;
  ``missing``: the cell's image is no longer where the run recorded it);
* ``PUT /api/cells/{id}`` with ``{"label": L, "version": V}`` (one of the five types or ``other``;
  ``V``: the cell's ``version`` the page showed) -> the cell; 422 for any other label, 404 for an
  unknown id, 409 if the cell changed since version ``V`` (another reviewer, another tab: nothing is
  saved); ``DELETE /api/cells/{id}/review?version=V`` undoes it;
* ``GET /api/differential`` -> the live totals, shaped like ``counts.json``'s;
* ``GET /api/audit`` -> ``{"changes": [...]}``: every change in order, undone ones too (the export's audit.csv);
* ``GET /api/cells/{id}/image``, ``/field``, ``/gradcam`` -> the cell, its field with its box,
  and its Grad-CAM map; files are found through the cell's row, never through a request path;
* ``POST /api/export`` -> writes the verified cells and differential (see :mod:`wbcid.web.export`) and
  says what the export holds.

What the app cannot do (an export folder in the way, a field image gone, Grad-CAM with an ONNX
model) is a 409 whose ``detail`` says why, as the command line would. A change sent by another
site's page (its ``Origin``) is a 403; served on the loopback address, a request addressed to any
other name is a 400 (:func:`local_names_only`).
"""

from __future__ import annotations

import errno
import getpass
import hashlib
import ipaddress
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..data import CLASSES
from ..errors import WbcidError
from ..loading import resolve_model
from .export import export_review, export_summary
from .store import LABELS, ReviewStore, cell_image

log = logging.getLogger("wbcid")
HERE = Path(__file__).parent
PORTS = range(8765, 8775)  # the first free one serves a review without --port: one per slide, side by side


class Correction(BaseModel):
    """A person's label for one cell."""

    label: Literal["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "other"]
    reviewer: str | None = Field(None, max_length=100)
    version: int | None = Field(
        None,
        ge=0,
        description="the cell's `version` as the client last saw it: if it has changed since, "
        "nothing is saved (409); left out, the label is set whatever happened meanwhile",
    )


assert set(Correction.model_fields["label"].annotation.__args__) == set(LABELS)


def create_app(
    run: str | os.PathLike,
    model: str | os.PathLike | None = None,
    reviewer: str | None = None,
    images: str | os.PathLike | None = None,
) -> FastAPI:
    """The application over one run (a count folder or a prediction CSV); ``images``: see
    :meth:`ReviewStore.open`. Its store is ``app.state.store``."""
    store = ReviewStore.open(run, images)
    reviewer = reviewer or _user()
    app = FastAPIOffline(  # serves its docs' assets itself: no CDN
        title="wbcid review", version=__version__, docs_url="/api/docs", redoc_url=None
    )
    app.state.store = store
    app.add_middleware(_SameSite)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    gradcam = _GradCam(store, model)

    def one(cell_id: int) -> dict:
        try:
            return store.cell(cell_id)
        except KeyError:
            raise HTTPException(404, f"no cell {cell_id}") from None

    def marked(*cells: dict) -> list[dict]:
        """Cells as the page gets them: each says whether its image is gone (one stat per image)."""
        gone = store.missing(cell["image"] for cell in cells)
        return [cell | {"missing": cell["image"] in gone} for cell in cells]

    @app.exception_handler(WbcidError)
    def refused(request: Request, exc: WbcidError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        return templates.TemplateResponse(
            request,
            "review.html",
            {
                "classes": CLASSES,
                "run": str(store.meta("run")),
                "model": store.meta("model") or "not recorded",
                "warnings": [  # a technologist reads the page
                    *store.meta("warnings", []),
                    *filter(None, [store.meta("carried")]),
                    *_missing_warning(store),
                ],
                "reviewer": reviewer,
            },
        )

    @app.get("/api/cells")
    def cells() -> dict:
        return {"cells": marked(*store.cells())}

    @app.get("/api/cells/{cell_id}")
    def get_cell(cell_id: int) -> dict:
        return marked(one(cell_id))[0]

    @app.put("/api/cells/{cell_id}")
    def correct(cell_id: int, body: Correction) -> dict:
        try:
            return marked(store.set_label(cell_id, body.label, body.reviewer or reviewer, body.version))[0]
        except KeyError:
            raise HTTPException(404, f"no cell {cell_id}") from None

    @app.delete("/api/cells/{cell_id}/review")
    def undo(cell_id: int, version: int | None = None) -> dict:
        try:
            return marked(store.set_label(cell_id, None, reviewer, version))[0]
        except KeyError:
            raise HTTPException(404, f"no cell {cell_id}") from None

    @app.get("/api/differential")
    def live_differential() -> dict:
        return store.differential()

    @app.get("/api/audit")
    def audit() -> dict:
        return {"changes": store.audit()}

    @app.get("/api/cells/{cell_id}/image")
    def image(cell_id: int) -> FileResponse:
        one(cell_id)
        return FileResponse(store.thumbnail(cell_id), media_type="image/jpeg")

    @app.get("/api/cells/{cell_id}/field")
    def field(cell_id: int) -> FileResponse:
        one(cell_id)
        return FileResponse(store.field_view(cell_id), media_type="image/jpeg")

    @app.get("/api/cells/{cell_id}/gradcam")
    def explain(cell_id: int) -> FileResponse:
        return FileResponse(gradcam(one(cell_id)), media_type="image/png")

    @app.post("/api/export")
    def export() -> dict:
        out = export_review(store, store.folder / "verified", chosen=False)
        counts = json.loads((out / "counts.json").read_text())
        return {
            "path": str(out),
            "verified": counts["verified_by_person"],
            "exported": counts["exported"],
            "summary": export_summary(out, counts),
        }

    return app


class _SameSite:
    """Changes only from the app's own page: a page of another site, open in the technologist's browser,
    could otherwise send them to the review's address (cross-site request forgery). Browsers name the
    page a request comes from in ``Origin``; scripts and tests send none. (Plain ASGI: Starlette's
    ``@app.middleware`` costs every request a task.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
            origin = headers.get(b"origin")
            if origin and urlsplit(origin).netloc != headers.get(b"host"):
                refusal = JSONResponse({"detail": f"refused: a change sent by another site's page ({origin})"}, 403)
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


class _GradCam:
    """Grad-CAM maps of cells, made on first request and cached per model. The model is the one given,
    else the one that made the count or prediction CSV (its answers are the ones on the page; recorded
    as given, so a relative path is read from the folder the review starts in, as the images are)."""

    def __init__(self, store: ReviewStore, model: str | os.PathLike | None):
        if model is None and (model := store.made_by()) is not None and not Path(model).exists():
            log.warning(
                "the model that made this run, %s, is not found from %s: pass --model for Grad-CAM", model, Path.cwd()
            )
        key = hashlib.blake2b(str(model and Path(model).resolve()).encode(), digest_size=4).hexdigest()
        self.store, self.model_path, self.model, self.lock = store, model, None, threading.Lock()
        self.cache = store.folder / "gradcam" / key

    def __call__(self, cell: dict) -> Path:

        from ..gradcam import grad_cam, overlay
        from ..preprocess import Preprocess, to_tensor

        path = self.cache / f"{cell['id']}.png"
        if path.is_file():
            return path
        with self.lock:  # one model, one computation at a time
            if self.model is None:
                self.model = resolve_model(self.model_path, needs_torch="Grad-CAM")
            seen = Preprocess.of(self.model.config)(cell_image(cell))
            heat, _ = grad_cam(self.model, to_tensor(seen)[None])
            path.parent.mkdir(parents=True, exist_ok=True)
            overlay(seen, heat[0]).resize((256, 128)).save(path)
        return path


def _missing_warning(store: ReviewStore) -> list[str]:
    """What the server says at start, and the page on each load, when images of the run have gone."""
    if not (gone := store.missing()):
        return []
    return [
        f"{len(gone)} of the run's images are not where it records them, e.g. {min(gone)}: their cells stay in "
        "the differential and can be labelled, but show no picture (unless cut before) and are not exported; "
        "put them back, or start the review with --images FOLDER, the folder they were moved to"
    ]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


def serve(
    run: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int | None = None,
    model: str | os.PathLike | None = None,
    reviewer: str | None = None,
    images: str | os.PathLike | None = None,
) -> None:
    """Cut the thumbnails, then serve the review app until Ctrl-C (``port`` 0: any free port; None: the
    first free one of ``PORTS``, so that a second review, of another slide, starts too)."""
    import uvicorn

    if port is not None and not 0 <= port <= 65535:
        raise WbcidError(f"{port} is not a port: pass --port 0-65535 (0: any free port)")
    address = _resolve(host)  # a host that is not one fails before the thumbnails are cut
    if model is not None and not Path(model).exists():  # its Grad-CAM maps failed one by one on the page
        raise WbcidError(f"--model {model}: no such run directory or model file (the model for the Grad-CAM maps)")
    app = create_app(run, model, reviewer, images)
    store = app.state.store
    for warning in _missing_warning(store):
        log.warning(warning)
    made = store.make_thumbnails()
    if made:
        log.info("cut %d thumbnails (cached for the next start)", made)
    if ipaddress.ip_address(address).is_loopback:
        local_names_only(app, host)
    else:
        log.warning("serving on %s: anyone who can reach this address can read and change the review", host)
    with _listen(host, address, port) as sock:
        print(
            f"review at http://{host}:{sock.getsockname()[1]}/  (Ctrl-C stops; every correction is already saved)",
            flush=True,
        )
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def local_names_only(app: FastAPI, host: str) -> None:
    """Serve only requests addressed to this machine by its own names: a site whose name is made to
    point at 127.0.0.1 (DNS rebinding) could otherwise read and change the review from a page of its own."""
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", host])


def _listen(host: str, address: str, port: int | None) -> socket.socket:
    """The server's socket on ``host``'s ``address``, bound before the address is announced: a port that
    another program (or a second review) holds gets a clear message, not a link to that program. Without
    a ``port``, the first free one of ``PORTS``."""
    for candidate in PORTS if port is None else [port]:
        sock = socket.socket(socket.AF_INET)  # _resolve gives IPv4 addresses
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
        try:
            sock.bind((address, candidate))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRNOTAVAIL:  # the advice to pass another port sent the user the wrong way
                raise WbcidError(
                    f"cannot serve on {host} ({exc.strerror}): not an address of this machine; pass one of its "
                    "own with --host (0.0.0.0: all of them), or leave --host out to serve on this machine alone"
                ) from None
            reason = exc.strerror
    ports = f"{PORTS[0]}-{PORTS[-1]}" if port is None else port
    raise WbcidError(f"cannot serve on {host}:{ports} ({reason}): other reviews? pass another --port")


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise WbcidError(f"cannot serve on {host}: no such address ({exc.strerror}); pass --host") from exc
