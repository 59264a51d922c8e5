"""The HTTP+JSON API (FastAPI on uvicorn): routes over the Service, the gate in front of every request (gate.py:
token, size, uploads), and error handlers that answer every refusal with a JSON body {"error": one line, "code": ...}.

OpenAPI: /docs (interactive page) and /openapi.json describe every route, its answers and errors (schema.py).
"""

from __future__ import annotations

import functools
import json
import logging

from fastapi import Body, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from sslmedsam2 import __version__
from sslmedsam2.errors import UserError
from sslmedsam2.frames import CT_WINDOWS
from sslmedsam2.server.connections import UNREAD_ANSWER
from sslmedsam2.server.errors import ServiceError
from sslmedsam2.server.gate import Gate
from sslmedsam2.server.schema import (ENCODINGS, GATE_ERRORS, JOB_LINKS, QUERY, RAW_FORMAT, RESULT_HEADER,
                                      SESSION_LINKS, Closed, ErrorBody, Health, JobInfo, LabelArray, PropagateRequest, Undone,
                                      ServerInfo, SessionInfo, errors, install_openapi, result_header)
from sslmedsam2.server.service import Service
from sslmedsam2.remote.tokens import TokenCheck
from sslmedsam2.remote.wire import API_VERSION, INSTANCE_HEADER, array_message

log = logging.getLogger("sslmedsam2.server")
BINARY = {"schema": {"type": "string", "format": "binary"}}


class CSVResponse(PlainTextResponse):
    media_type = "text/csv"


def _one_line(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "bad request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"bad request: {where}: {first.get('msg', 'invalid')}{more}"


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route of this request's path takes (the `Allow` of a 405)."""
    found: set[str] = set()
    for route in app.router.routes:
        if route.matches(scope)[0] is not Match.NONE:
            found |= set(getattr(route, "methods", None) or ())
    return sorted(found)


def _error(message: str, code: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=message, code=code).model_dump(), status_code=status, headers=headers)


def create_app(service: Service, tokens: TokenCheck | None = None) -> FastAPI:
    tokens = tokens or TokenCheck(service.settings.tokens)
    app = FastAPI(title="SSLMedSAM2 interactive engine", version=__version__, responses=errors(*GATE_ERRORS),
                  description="SAM2 propagation of drawn slices through 3D volumes, with each open volume's slice "
                  "features kept between propagations. Every request needs 'Authorization: Bearer <token>' when "
                  "the server has a token file. Every refusal is a JSON body {\"error\": one line, \"code\"}.")
    install_openapi(app, tokens.required)

    def owner(request: Request) -> str:
        return request.state.owner

    @app.exception_handler(ServiceError)
    async def _service_error(request, exc: ServiceError):
        return _error(str(exc), exc.code, exc.status)

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        return _error(str(exc), "bad_request", 400)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return _error(_one_line(exc), "bad_request", 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the methods of the first route of the path only
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return _error(message, "http", exc.status_code, headers)

    @app.exception_handler(MemoryError)
    async def _memory(request, exc: MemoryError):
        return _error("out of memory on the server: send a smaller image, or close other sessions", "out_of_memory",
                      507)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        # answered by Starlette's outermost middleware, outside the Gate that tags every other answer
        return _error(f"internal error: {type(exc).__name__} (the server keeps running; see its log)", "internal",
                      500, {INSTANCE_HEADER: service.instance})

    typed = {"response_model_exclude_unset": True}  # a job's result and labels, CUDA memory: only when there

    @app.get("/health", summary="Liveness: the server answers")
    def health() -> Health:
        return Health(status="ok", version=__version__, api=API_VERSION, instance=service.instance)

    @app.get("/info", summary="Version, device, models, sessions, memory in use, limits", **typed)
    def info(request: Request) -> ServerInfo:
        return service.info(owner(request))

    @app.get("/sessions", summary="Your open sessions", **typed)
    def sessions(request: Request) -> list[SessionInfo]:
        return service.list_sessions(owner(request))

    @app.post("/sessions", status_code=201, summary="Open a session: the image file's own bytes as the body",
              responses={201: {"links": SESSION_LINKS}, **errors(400)}, **typed, openapi_extra={"requestBody": {
                  "required": True, "content": {"application/octet-stream": BINARY}, "description": (
                      "the image file's own bytes (.nii.gz, .nii, .nrrd or .mha with its data inside), "
                      "gzip-compressed with encoding=gzip")}})
    async def open_session(
            request: Request,
            name: str = Query("image.nii.gz", description="the file's name; its suffix (.nii.gz, .nii, .nrrd, "
                              ".mha) picks the reader (any other: read by content), and messages name it"),
            axis: str = Query("axial", description="the slicing plane", json_schema_extra=QUERY["axis"]),
            modality: str = Query("mri", description="mri (percentile clip) or ct (a window)",
                                  json_schema_extra=QUERY["modality"]),
            window: str = Query("soft-tissue", description="CT window (with modality=ct)",
                                json_schema_extra=QUERY["window"]),
            range_min: float | None = Query(None, description="explicit intensity range: with range_max, below it"),
            range_max: float | None = Query(None, description="with range_min, above it"),
            model: str | None = Query(None, description="default: the server's; the weights of another are "
                                      "fetched at its first propagation", json_schema_extra=QUERY["model"]),
            image_size: int | None = Query(None, description="SAM2 input size; default: the server's",
                                           json_schema_extra=QUERY["image_size"]),
            encoding: str | None = Query(None, description="gzip: the body is the file gzip-compressed",
                                         json_schema_extra=QUERY["encoding"])) -> SessionInfo:
        if (range_min is None) != (range_max is None):
            raise UserError("intensity range: give both range_min and range_max")
        if encoding is not None and encoding not in ENCODINGS:
            raise UserError(f"unknown encoding {encoding!r}; use {' or '.join(ENCODINGS)}")
        if window not in CT_WINDOWS:  # refused whatever the modality: a misspelt window is never meant
            raise UserError(f"unknown CT window {window!r}; choose one of {', '.join(CT_WINDOWS)}")
        data = await request.body()
        if not data:
            raise UserError("no image: send the image file's bytes as the request body")
        value_range = None if range_min is None else (range_min, range_max)
        opened = await run_in_threadpool(service.open_session, owner(request), data, name, axis, modality, window,
                                         value_range, model, image_size, encoding == "gzip")
        # a client that left meanwhile (Ctrl-C, a timeout), or leaves without reading this answer, will not close it
        abandon = functools.partial(service.abandon_session, owner(request), opened["session"])
        if await request.is_disconnected():
            await run_in_threadpool(abandon)
        else:
            request.scope["state"][UNREAD_ANSWER] = abandon
        return opened

    @app.get("/sessions/{session_id}", summary="A session: grid, prompts, last result, current job, features",
             responses=errors(404), **typed)
    def session_info(session_id: str, request: Request) -> SessionInfo:
        return service.session_info(owner(request), session_id)

    @app.delete("/sessions/{session_id}", summary="Close a session; its data is deleted", responses=errors(404))
    def close_session(session_id: str, request: Request) -> Closed:
        service.close_session(owner(request), session_id)
        return Closed(closed=session_id)

    @app.post("/sessions/{session_id}/propagate", status_code=202, **typed,
              responses={202: {"links": JOB_LINKS}, **errors(400, 404)},
              summary="Propagate from the prompt slices; answers a job to poll")
    def propagate(session_id: str, request: Request, body: PropagateRequest = Body(...)) -> JobInfo:
        slices = [s.model_dump() for s in body.slices]
        return service.propagate(owner(request), session_id, slices, body.replace, body.mode)

    @app.post("/sessions/{session_id}/undo", summary="Back to the session's previous result, exactly",
              responses=errors(404, 409), **typed)
    def undo(session_id: str, request: Request) -> Undone:
        return service.undo(owner(request), session_id)

    @app.get("/sessions/{session_id}/labels", summary="The last result's label map", response_model=None,
             responses={200: {"model": LabelArray, "headers": result_header(), "description": (
                 "format=nifti: .nii.gz bytes; nrrd: .nrrd bytes (keeps a sheared grid); raw: JSON"), "content": {
                 "application/gzip": BINARY, "application/octet-stream": BINARY}}, **errors(400, 404)})
    def labels(session_id: str, request: Request,
               format: str = Query("nifti", description="nifti or nrrd (a file on the image grid) or raw (JSON: "
                                   "slice-first along the session's axis, zlib + base64)",
                                   json_schema_extra=QUERY["format"])) -> Response:
        if format == RAW_FORMAT:
            array, result = service.labels_array(owner(request), session_id)
            return JSONResponse({"result": result, **array_message(array)}, headers={RESULT_HEADER: str(result)})
        data, result = service.labels_file(owner(request), session_id, format)
        suffix = ".nii.gz" if format == "nifti" else ".nrrd"
        return Response(data, media_type="application/gzip" if format == "nifti" else "application/octet-stream",
                        headers={RESULT_HEADER: str(result),
                                 "Content-Disposition": f'attachment; filename="labels{suffix}"'})

    @app.get("/sessions/{session_id}/confidence", summary="The last result's confidence table (CSV)",
             response_class=CSVResponse, responses={200: {"headers": result_header(), "description": (
                 "the table exactly as propagate writes it"), "content": {"text/csv": {"schema": {"type": "string"}}}},
                 **errors(404)})
    def confidence(session_id: str, request: Request) -> CSVResponse:
        text, result = service.confidence_csv(owner(request), session_id)
        return CSVResponse(text, headers={RESULT_HEADER: str(result)})

    @app.get("/jobs/{job_id}", summary="A job's state and progress; wait=S blocks up to S s (30 at most) for its end",
             responses=errors(400, 404), **typed)
    def job(job_id: str, request: Request, wait: float = Query(0.0, ge=0.0, le=30.0, description="seconds")) -> JobInfo:
        return service.job(owner(request), job_id, wait)

    @app.post("/jobs/{job_id}/cancel", summary="Ask a job to stop at its next step", responses=errors(404), **typed)
    def cancel(job_id: str, request: Request) -> JobInfo:
        return service.cancel(owner(request), job_id)

    app.add_middleware(Gate, service=service, tokens=tokens)
    return app
