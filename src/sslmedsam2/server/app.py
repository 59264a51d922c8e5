"""The HTTP+JSON API (FastAPI on uvicorn): routes over the Service, the gate in front of every request (gate.py:
token, size, uploads), and error handlers that answer every refusal with a JSON body {"error": one line, "code": ...}.

OpenAPI: /docs (interactive page) and /openapi.json describe every route.
"""

from __future__ import annotations

import functools
import json
import logging

from fastapi import Body, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from sslmedsam2 import __version__
from sslmedsam2.errors import UserError
from sslmedsam2.server.connections import UNREAD_ANSWER
from sslmedsam2.server.errors import ServiceError
from sslmedsam2.server.gate import Gate
from sslmedsam2.server.service import Service
from sslmedsam2.server.tokens import TokenCheck
from sslmedsam2.server.wire import INSTANCE_HEADER, array_message

RESULT_HEADER = "X-SSLMedSAM2-Result"
log = logging.getLogger("sslmedsam2.server")


class SeedSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(description="slice index along the session's axis (0-based)")
    dtype: str = Field("uint8", description="uint8, uint16, int16, int32 or uint32")
    data: str = Field(description="base64 of the zlib-compressed C-order (height, width) label plane")


class PropagateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slices: list[SeedSlice] = Field(description="drawn, edited or accepted slices; every label on a slice is a "
                                    "seed of that label there")
    replace: bool = Field(True, description="true: these slices are the prompts; false: they update the "
                          "session's prompts (an all-zero plane removes that slice)")


def _one_line(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "bad request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"bad request: {where}: {first.get('msg', 'invalid')}{more}"


def create_app(service: Service, tokens: TokenCheck | None = None) -> FastAPI:
    tokens = tokens or TokenCheck(service.settings.tokens)
    app = FastAPI(title="SSLMedSAM2 interactive engine", version=__version__,
                  description="SAM2 propagation of drawn slices through 3D volumes, with each open volume's slice "
                  "features kept between propagations. Every request needs 'Authorization: Bearer <token>' when "
                  "the server has a token file.")

    def owner(request: Request) -> str:
        return request.state.owner

    @app.exception_handler(ServiceError)
    async def _service_error(request, exc: ServiceError):
        return JSONResponse({"error": str(exc), "code": exc.code}, status_code=exc.status)

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        return JSONResponse({"error": str(exc), "code": "bad_request"}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return JSONResponse({"error": _one_line(exc), "code": "bad_request"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse({"error": message, "code": "http"}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(MemoryError)
    async def _memory(request, exc: MemoryError):
        return JSONResponse({"error": "out of memory on the server: send a smaller image, or close other sessions",
                             "code": "out_of_memory"}, status_code=507)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        # answered by Starlette's outermost middleware, outside the Gate that tags every other answer
        return JSONResponse({"error": f"internal error: {type(exc).__name__} (the server keeps running; see its log)",
                             "code": "internal"}, status_code=500, headers={INSTANCE_HEADER: service.instance})

    @app.get("/health", summary="Liveness: the server answers")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "instance": service.instance}

    @app.get("/info", summary="Version, device, models, sessions, memory in use, limits")
    def info(request: Request) -> dict:
        return service.info(owner(request))

    @app.get("/sessions", summary="Your open sessions")
    def sessions(request: Request) -> list[dict]:
        return service.list_sessions(owner(request))

    @app.post("/sessions", status_code=201, summary="Open a session: the image file's own bytes as the body",
              openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                  "schema": {"type": "string", "format": "binary"}}}}})
    async def open_session(
            request: Request,
            name: str = Query("image.nii.gz", description="the file's name; its suffix (.nii.gz, .nii, .nrrd, "
                              ".mha) picks the reader, and messages name it"),
            axis: str = Query("axial", description="axial, coronal or sagittal"),
            modality: str = Query("mri", description="mri (percentile clip) or ct (a window)"),
            window: str = Query("soft-tissue", description="CT window name"),
            range_min: float | None = Query(None, description="explicit intensity range (with range_max)"),
            range_max: float | None = Query(None),
            model: str | None = Query(None, description="default: the server's"),
            image_size: int | None = Query(None, description="SAM2 input size; default: the server's"),
            encoding: str | None = Query(None, description="gzip: the body is the file gzip-compressed")) -> dict:
        if (range_min is None) != (range_max is None):
            raise UserError("intensity range: give both range_min and range_max")
        if encoding not in (None, "", "identity", "gzip"):
            raise UserError(f"unknown encoding {encoding!r}; use gzip or none")
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

    @app.get("/sessions/{session_id}", summary="A session: grid, prompts, last result, current job, features")
    def session_info(session_id: str, request: Request) -> dict:
        return service.session_info(owner(request), session_id)

    @app.delete("/sessions/{session_id}", summary="Close a session; its data is deleted")
    def close_session(session_id: str, request: Request) -> dict:
        service.close_session(owner(request), session_id)
        return {"closed": session_id}

    @app.post("/sessions/{session_id}/propagate", status_code=202,
              summary="Propagate from the prompt slices; answers a job to poll")
    def propagate(session_id: str, request: Request, body: PropagateRequest = Body(...)) -> dict:
        slices = [s.model_dump() for s in body.slices]
        return service.propagate(owner(request), session_id, slices, body.replace)

    @app.get("/sessions/{session_id}/labels", summary="The last result's label map",
             responses={200: {"content": {"application/gzip": {}, "application/json": {}}}})
    def labels(session_id: str, request: Request,
               format: str = Query("nifti", description="nifti (.nii.gz bytes), nrrd (.nrrd bytes, keeps a sheared "
                                   "grid) or raw (JSON: slice-first array along the axis, zlib + base64)")):
        if format == "raw":
            array, result = service.labels_array(owner(request), session_id)
            return JSONResponse({"result": result, **array_message(array)}, headers={RESULT_HEADER: str(result)})
        data, result = service.labels_file(owner(request), session_id, format)
        suffix = ".nii.gz" if format == "nifti" else ".nrrd"
        return Response(data, media_type="application/gzip" if format == "nifti" else "application/octet-stream",
                        headers={RESULT_HEADER: str(result),
                                 "Content-Disposition": f'attachment; filename="labels{suffix}"'})

    @app.get("/sessions/{session_id}/confidence", summary="The last result's confidence table (CSV)",
             response_class=PlainTextResponse)
    def confidence(session_id: str, request: Request):
        text, result = service.confidence_csv(owner(request), session_id)
        return PlainTextResponse(text, media_type="text/csv", headers={RESULT_HEADER: str(result)})

    @app.get("/jobs/{job_id}", summary="A job's state and progress; wait=S blocks up to S s (30 at most) for its end")
    def job(job_id: str, request: Request, wait: float = Query(0.0, ge=0.0, le=30.0)) -> dict:
        return service.job(owner(request), job_id, wait)

    @app.post("/jobs/{job_id}/cancel", summary="Ask a job to stop at its next step")
    def cancel(job_id: str, request: Request) -> dict:
        return service.cancel(owner(request), job_id)

    app.add_middleware(Gate, service=service, tokens=tokens)
    return app
