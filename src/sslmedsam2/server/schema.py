"""The HTTP API's contract as the OpenAPI description states it: the request and answer bodies (pydantic models),
the choices and ranges of the query parameters, every error status with its body, the bearer token, the headers.

The choices come from the engine's own constants (models, CT windows, slice axes, label formats and dtypes), never
from a second list. Where the engine checks a choice itself (model, axis, modality, window, format, dtype, image
size) the description states it but FastAPI does not enforce it, so that the refusal is the engine's one line, the
one the command line prints. The answers go through these models: a field the service adds that is not declared
here is not sent (declare it here); one declared here and missing is a 500."""

from __future__ import annotations

from enum import Enum
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from sslmedsam2.frames import CT_WINDOWS
from sslmedsam2.models.registry import MAX_IMAGE_SIZE, MODELS, image_size_problem
from sslmedsam2.server.errors import ServiceError
from sslmedsam2.server.jobs import FINAL
from sslmedsam2.server.service import LABEL_FORMATS
from sslmedsam2.remote.wire import INSTANCE_HEADER, LABEL_DTYPES
from sslmedsam2.settings import MODALITIES, MODES
from sslmedsam2.volume import SliceAxis

RESULT_HEADER = "X-SSLMedSAM2-Result"
SECURITY_SCHEME = "bearerToken"
ENCODINGS = ("identity", "gzip")  # of an upload's body
RAW_FORMAT = "raw"
LABEL_MAP_FORMATS = (*LABEL_FORMATS, RAW_FORMAT)
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

ModelName = Enum("ModelName", {name: name for name in MODELS}, type=str)
JobState = Enum("JobState", {state: state for state in ("queued", "running", *FINAL)}, type=str)
Mode = Enum("Mode", {mode: mode for mode in MODES}, type=str)
LabelDtype = Enum("LabelDtype", {dtype: dtype for dtype in LABEL_DTYPES}, type=str)


def one_of(values) -> dict[str, Any]:
    """The schema of a choice the engine checks itself (its refusal is the command line's line)."""
    return {"enum": [getattr(v, "value", v) for v in values]}


def _error_codes(cls: type[ServiceError] = ServiceError) -> set[str]:
    return {cls.code}.union(*(_error_codes(sub) for sub in cls.__subclasses__()))


ERROR_CODES = (*sorted(_error_codes()), "http", "internal")  # http: no such path or method; internal: a 500


# --- answers ----------------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every refusal: one line (for bad input, the line the command line prints after `sslmedsam2: error:`)."""

    error: str = Field(description="what went wrong and what to do, one line")
    code: str = Field(description="session_gone: the session was closed, expired or the server restarted; http: no "
                      "such path or method; internal: a server error", json_schema_extra=one_of(ERROR_CODES))


class Health(BaseModel):
    status: str = Field(json_schema_extra=one_of(["ok"]))
    version: str
    api: int = Field(description="the HTTP API's version: a client opens sessions only on the API it speaks")
    instance: str = Field(description="changes each time the server starts (also in every answer's "
                          f"{INSTANCE_HEADER} header)")


class BuiltModel(BaseModel):
    name: ModelName
    image_size: int


class Memory(BaseModel):
    budget_bytes: int | None = Field(description="cap on cached features plus uploads being read")
    uploads_bytes: int = Field(ge=0)
    features_bytes: int = Field(ge=0)
    rss_bytes: int | None = Field(description="the server's resident memory; null where it cannot tell")
    gpu_allocated_bytes: int | None = Field(None, description="on CUDA only")
    gpu_free_bytes: int | None = Field(None, description="on CUDA only")
    gpu_total_bytes: int | None = Field(None, description="on CUDA only")


class Limits(BaseModel):
    max_sessions: int
    max_sessions_per_token: int
    max_uploads: int = Field(description="request bodies over 1 MB read at once")
    idle_timeout_s: float
    max_request_bytes: int
    max_voxels: int


class ServerInfo(BaseModel):
    service: str = Field(json_schema_extra=one_of(["sslmedsam2"]))
    version: str
    api: int = Field(description="the HTTP API's version (as in /health)")
    instance: str
    device: str = Field(description="torch device, e.g. cpu or cuda:0")
    default_model: ModelName
    default_image_size: int
    models_built: list[BuiltModel]
    sessions: int = Field(ge=0, description="all tokens'")
    your_sessions: int = Field(ge=0)
    jobs_active: int = Field(ge=0)
    memory: Memory
    limits: Limits


class JobInfo(BaseModel):
    """A job's state; `result` and `labels` only once it is done."""

    job: str
    kind: str = Field(description="what it does: propagate")
    session: str | None
    state: JobState = Field(description="queued, running, then done, failed or cancelled (final)")
    done: int = Field(ge=0, description="steps done: slices encoded, then tracking steps")
    total: int | None = Field(description="steps in all; null until known")
    error: str | None = Field(description="the one-line error of a failed or cancelled job")
    cancel_requested: bool
    seconds: float | None = Field(description="running time; null until started")
    result: int | None = Field(None, ge=1, description="done only: the session's result counter it made")
    labels: list[int] | None = Field(None, description="done only: the labels found")
    mode: Mode | None = Field(None, description="done only: local (re-tracked around the corrected slices) or "
                              "exact (every slice tracked anew)")
    retracked: list[int] | None = Field(None, description="done only, local: the slices re-tracked; the others "
                                        "kept their previous result")


class SessionInfo(BaseModel):
    """An open volume. Its slices are the image's numpy (z, y, x) array with `array_axis` moved first: `slices`
    planes of `height` x `width`, the order of seed slices and of the raw label map."""

    session: str
    name: str = Field(description="the file's name as sent (control characters replaced)")
    slices: int = Field(ge=1, description="planes along `axis`")
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    axis: SliceAxis
    array_axis: int = Field(ge=0, le=2, description="the numpy (z, y, x) axis the slices run along")
    size: list[int] = Field(min_length=3, max_length=3, description="the image's size (x, y, z)")
    spacing: list[float] = Field(min_length=3, max_length=3)
    origin: list[float] = Field(min_length=3, max_length=3)
    direction: list[float] = Field(min_length=9, max_length=9, description="row-major direction cosines")
    model: ModelName
    image_size: int
    prompt_slices: list[int] = Field(description="slices holding the prompts of the last result")
    result: int = Field(ge=0, description="a counter: 0 before the first result, +1 at each")
    can_undo: bool = Field(description="whether POST /sessions/{id}/undo has an earlier result to go back to")
    labels: list[int]
    job: JobInfo | None = Field(description="the current or last job")
    feature_bytes: int = Field(ge=0)
    features_on: str | None = Field(description="the device holding its slice features; null: none held")
    idle_s: float = Field(ge=0)


class Closed(BaseModel):
    closed: str = Field(description="the closed session's id")


class LabelArray(BaseModel):
    """The last result's label map, `format=raw`: slice-first along the session's axis."""

    result: int = Field(ge=1)
    shape: list[int] = Field(min_length=3, max_length=3, description="(slices, height, width) as the session's")
    dtype: LabelDtype
    data: str = Field(description="base64 of the zlib-compressed C-order bytes",
                      json_schema_extra={"contentEncoding": "base64", "pattern": BASE64})


# --- requests ---------------------------------------------------------------------------------------------------
class SeedSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0, description="slice index along the session's axis (0 .. slices - 1)")
    dtype: str = Field("uint8", description="the plane's integer type", json_schema_extra=one_of(LABEL_DTYPES))
    data: str = Field(description="base64 of the zlib-compressed C-order (height, width) label plane",
                      json_schema_extra={"contentEncoding": "base64", "pattern": BASE64})


class PropagateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slices: list[SeedSlice] = Field(description="drawn, edited or accepted slices; every label on a slice is a "
                                    "seed of that label there")
    replace: bool = Field(True, description="true: these slices are the prompts; false: they update the "
                          "session's prompts (an all-zero plane removes that slice)")
    mode: str = Field("local", description="local (default): an edit re-tracks around the slices it changes; "
                      "exact: every slice again (what a cold propagate computes). A first propagation, a removed "
                      "prompt or another set of labels is always exact", json_schema_extra=one_of(MODES))


class Undone(BaseModel):
    result: int = Field(ge=1, description="the session's result counter of the result restored")
    labels: list[int]
    can_undo: bool


_SIZES = [size for size in range(1, MAX_IMAGE_SIZE + 1) if image_size_problem(size) is None]  # the engine's rule
IMAGE_SIZE = {"minimum": _SIZES[0], "maximum": _SIZES[-1], "multipleOf": _SIZES[1] - _SIZES[0]}
QUERY = {  # the choices of the query parameters, as json_schema_extra
    "axis": one_of(SliceAxis), "modality": one_of(MODALITIES), "window": one_of(CT_WINDOWS),
    "model": one_of(MODELS), "image_size": IMAGE_SIZE, "encoding": one_of(ENCODINGS),
    "format": one_of(LABEL_MAP_FORMATS)}

# --- errors -----------------------------------------------------------------------------------------------------
_ERRORS: dict[int, str] = {
    400: "bad input: a parameter, the body or the image (the command line's line)",
    401: "missing or wrong token; the connection is closed",
    404: "no such session (code session_gone: closed, expired, another token's, or the server restarted), job "
         "(not_found) or path (http)",
    405: "this path does not take this method; `Allow` lists those it takes",
    408: "the request's body stalled; the connection is closed",
    409: "the session is propagating or has no result yet, the session limit (the server's or the token's) is "
         "reached, or the server reads its limit of uploads and none ended in time",
    413: "the request, the image or its slice features are too large (also an upload larger than the memory budget)",
    500: "internal error: the server keeps running and logs the traceback",
    507: "out of memory while reading, or no room in the memory budget beside the uploads being read",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}},
    405: {"Allow": {"description": "the methods this path takes", "required": True, "schema": {"type": "string"}}},
}
GATE_ERRORS = (401, 405, 408, 409, 413, 500, 507)  # any request: the gate in front of the routes, or the server


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` entries of these error statuses: each an ErrorBody, with its headers."""
    return {status: {"model": ErrorBody, "description": _ERRORS[status], **(
        {"headers": _ERROR_HEADERS[status]} if status in _ERROR_HEADERS else {})} for status in statuses}


def _operation(path: str, method: str) -> str:
    """An operation's JSON pointer in the description (RFC 6901 escapes)."""
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def links(parameter: str, field: str, **operations: tuple[str, str]) -> dict[str, Any]:
    """OpenAPI links: the answer's `field` is the `parameter` of these operations, by name: (path, method)."""
    return {name: {"operationRef": _operation(path, method), "parameters": {parameter: f"$response.body#/{field}"}}
            for name, (path, method) in operations.items()}


SESSION_LINKS = links("session_id", "session", describe=("/sessions/{session_id}", "get"),
                      close=("/sessions/{session_id}", "delete"),
                      propagate=("/sessions/{session_id}/propagate", "post"),
                      labels=("/sessions/{session_id}/labels", "get"),
                      confidence=("/sessions/{session_id}/confidence", "get"))
JOB_LINKS = links("job_id", "job", poll=("/jobs/{job_id}", "get"), cancel=("/jobs/{job_id}/cancel", "post"))


def result_header() -> dict[str, Any]:
    """The header naming the result an answer about it belongs to (its label map, its table)."""
    return {RESULT_HEADER: {"description": "the result counter the answer belongs to", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9]+$"}}}


# --- the description ----------------------------------------------------------------------------------------------
def install_openapi(app: FastAPI, token_required: bool) -> None:
    """Finish FastAPI's description: the bearer token on every route (optional on a server without a token file),
    the instance header on every answer, no 422 (a bad request is a 400), an optional query parameter absent
    rather than null."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _finish(build(), token_required)
        return app.openapi_schema

    app.openapi = openapi


def _finish(spec: dict[str, Any], token_required: bool) -> None:
    """What install_openapi says, done in place on FastAPI's description."""
    components = spec.setdefault("components", {})
    components["securitySchemes"] = {SECURITY_SCHEME: {
        "type": "http", "scheme": "bearer",
        "description": "a token from the server's token file; every route needs it when the server has one"}}
    spec["security"] = [{SECURITY_SCHEME: []}] if token_required else [{SECURITY_SCHEME: []}, {}]
    components["headers"] = {"Instance": {"description": "the server process that answered; a restart changes it",
                                          "required": True, "schema": {"type": "string"}}}
    for operation in (op for path in spec["paths"].values() for op in path.values()):
        operation["responses"].pop("422", None)
        for status, answer in operation["responses"].items():
            answer.setdefault("headers", {})[INSTANCE_HEADER] = {"$ref": "#/components/headers/Instance"}
            content = answer.get("content", {})
            if status[0] in "45" and "application/json" not in content:  # FastAPI gave it the route's own type
                answer["content"] = {"application/json": next(iter(content.values()))}
        for parameter in operation.get("parameters", []):
            _absent_not_null(parameter["schema"])
    schemas = components.get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


def _absent_not_null(schema: dict[str, Any]) -> None:
    """`T | None` query parameter: the parameter is left out, never sent as null; its schema is T's."""
    variants = schema.get("anyOf")
    if not variants or {"type": "null"} not in variants:
        return
    rest = [v for v in variants if v != {"type": "null"}]
    del schema["anyOf"]
    if len(rest) == 1:
        schema.update({**rest[0], **schema})
    else:
        schema["anyOf"] = rest
