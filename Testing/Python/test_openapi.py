"""The HTTP API's OpenAPI description is the contract a remote client is written against: valid OpenAPI 3.1; every
route with its errors (the {"error", "code"} body), a typed answer and the bearer token; the choices and ranges of
the parameters from the engine's own constants; and a server that keeps it: schemathesis (every check, a few
examples an operation, a valid NIfTI where an upload is needed) against a random-weight SAM2 server with a token
finds no 5xx and nothing the description does not declare."""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
import SimpleITK as sitk
from conftest import TINY_SIZE, seeds_on, synthetic_case, to_image

from sslmedsam2.frames import CT_WINDOWS
from sslmedsam2.models.registry import MAX_IMAGE_SIZE, MODELS, image_size_problem
from sslmedsam2.server.limits import ServerSettings
from sslmedsam2.server.main import serve_in_thread
from sslmedsam2.server.service import LABEL_FORMATS
from sslmedsam2.remote.wire import INSTANCE_HEADER, LABEL_DTYPES, slice_entry
from sslmedsam2.settings import MODALITIES
from sslmedsam2.volume import SliceAxis

TOKEN = "openapi-contract-" + "t" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ERROR_REF = "#/components/schemas/ErrorBody"
# what the gate in front of every route, or the server itself, may answer any request
GATE_ERRORS = {401, 405, 408, 409, 413, 500, 507}
SHAPE = (10, 24, 24)  # the uploads' image: small, label 1 on slices 3 to 9


def _nifti(shape=SHAPE) -> bytes:
    """A small valid image as .nii.gz bytes, what a client uploads."""
    image, _ = synthetic_case(shape=shape)
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "image.nii.gz"
        sitk.WriteImage(to_image(image), str(target))
        return target.read_bytes()


@pytest.fixture(scope="module")
def token_server(tiny_checkpoint, tmp_path_factory):
    settings = ServerSettings(port=0, device="cpu", model="sam2.1-tiny", checkpoint=tiny_checkpoint,
                              image_size=TINY_SIZE, workdir=tmp_path_factory.mktemp("openapi"), tokens=[TOKEN],
                              max_sessions=64, upload_wait_s=5, body_timeout_s=5)
    with serve_in_thread(settings) as (url, service):
        yield url, service


@pytest.fixture(scope="module")
def spec(token_server) -> dict:
    answer = requests.get(token_server[0] + "/openapi.json", headers=AUTH, timeout=30)
    assert answer.status_code == 200
    return answer.json()


def _operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_the_description_is_valid_openapi(spec):
    from openapi_spec_validator import validate

    validate(spec)
    assert spec["openapi"].startswith("3.1")


def test_every_route_declares_its_errors_a_typed_answer_and_the_token(spec):
    schemes = spec.get("components", {}).get("securitySchemes", {})
    bearer = [name for name, s in schemes.items() if (s["type"], s.get("scheme")) == ("http", "bearer")]
    assert len(bearer) == 1, schemes
    assert spec["security"] == [{bearer[0]: []}], "a server with a token file requires it on every route"
    own = {("post", "/sessions"): {400}, ("get", "/sessions/{session_id}"): {404},
           ("delete", "/sessions/{session_id}"): {404}, ("post", "/sessions/{session_id}/propagate"): {400, 404},
           ("get", "/sessions/{session_id}/labels"): {400, 404}, ("get", "/sessions/{session_id}/confidence"): {404},
           ("get", "/jobs/{job_id}"): {400, 404}, ("post", "/jobs/{job_id}/cancel"): {404},
           ("post", "/sessions/{session_id}/undo"): {404}}
    seen = set()
    for path, method, operation in _operations(spec):
        seen.add((method, path))
        statuses = {int(s) for s in operation["responses"]}
        assert 422 not in statuses, (method, path, "FastAPI's 422 is never sent: a bad request is a 400")
        errors = {s for s in statuses if s >= 400}
        assert errors == GATE_ERRORS | own.get((method, path), set()), (method, path, sorted(errors))
        for status, answer in operation["responses"].items():
            assert INSTANCE_HEADER in answer["headers"], (method, path, status)
            if int(status) >= 400:
                assert answer["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}, (method, path)
        success = [answer for status, answer in operation["responses"].items() if status.startswith("2")]
        assert len(success) == 1, (method, path)
        for media, content in success[0]["content"].items():
            schema = content["schema"]
            assert schema, (method, path, media, "an untyped answer")
            if media == "application/json":
                assert "$ref" in schema or "$ref" in schema.get("items", {}), (method, path, schema)
    assert seen == {*own, ("get", "/health"), ("get", "/info"), ("get", "/sessions")}
    assert "ErrorBody" in spec["components"]["schemas"] and "HTTPValidationError" not in spec["components"]["schemas"]


def test_without_a_token_file_the_token_is_optional():
    """A server on loopback without a token file takes requests with or without one."""
    from types import SimpleNamespace

    from sslmedsam2.server.app import create_app
    from sslmedsam2.remote.tokens import TokenCheck

    app = create_app(SimpleNamespace(settings=ServerSettings(), instance="x"), TokenCheck([]))
    scheme = next(iter(app.openapi()["components"]["securitySchemes"]))
    assert app.openapi()["security"] == [{scheme: []}, {}]


def test_parameters_and_bodies_carry_the_engines_choices_and_ranges(spec):
    paths, schemas = spec["paths"], spec["components"]["schemas"]

    def query(path: str, method: str = "get") -> dict:
        return {p["name"]: p["schema"] for p in paths[path][method]["parameters"] if p["in"] == "query"}

    opening = query("/sessions", "post")
    assert opening["axis"]["enum"] == [a.value for a in SliceAxis]
    assert opening["modality"]["enum"] == list(MODALITIES) == ["mri", "ct"]
    assert opening["window"]["enum"] == list(CT_WINDOWS)
    assert opening["model"]["enum"] == list(MODELS)
    assert opening["encoding"]["enum"] == ["identity", "gzip"]
    size = opening["image_size"]
    assert size["type"] == "integer" and size["maximum"] == MAX_IMAGE_SIZE == 2048
    described = [s for s in range(2 * MAX_IMAGE_SIZE) if size["minimum"] <= s <= size["maximum"] and
                 s % size["multipleOf"] == 0]
    assert described == [s for s in range(2 * MAX_IMAGE_SIZE) if image_size_problem(s) is None]
    assert all("null" not in str(schema) for schema in opening.values()), "a query parameter is absent, not null"
    body = paths["/sessions"]["post"]["requestBody"]
    assert body["required"] and list(body["content"]) == ["application/octet-stream"]
    assert query("/sessions/{session_id}/labels")["format"]["enum"] == [*LABEL_FORMATS, "raw"]
    assert (query("/jobs/{job_id}")["wait"]["minimum"], query("/jobs/{job_id}")["wait"]["maximum"]) == (0, 30)

    propagate = paths["/sessions/{session_id}/propagate"]["post"]["requestBody"]["content"]["application/json"]
    assert propagate["schema"] == {"$ref": "#/components/schemas/PropagateRequest"}
    seed = schemas["SeedSlice"]["properties"]
    assert seed["index"]["minimum"] == 0 and seed["dtype"]["enum"] == list(LABEL_DTYPES)
    assert seed["data"]["contentEncoding"] == "base64" and "pattern" in seed["data"]
    assert schemas["PropagateRequest"]["properties"]["replace"]["type"] == "boolean"
    assert schemas["JobState"]["enum"] == ["queued", "running", "done", "failed", "cancelled"]
    assert schemas["LabelDtype"]["enum"] == list(LABEL_DTYPES)
    assert "slice-first" in schemas["LabelArray"]["description"]
    assert "(slices, height, width)" in schemas["LabelArray"]["properties"]["shape"]["description"]
    labels = paths["/sessions/{session_id}/labels"]["get"]["responses"]["200"]["content"]
    assert labels["application/json"]["schema"] == {"$ref": "#/components/schemas/LabelArray"}
    assert set(labels) == {"application/json", "application/gzip", "application/octet-stream"}
    assert list(paths["/sessions/{session_id}/confidence"]["get"]["responses"]["200"]["content"]) == ["text/csv"]


@pytest.mark.parametrize("params, fragment", [
    ({"window": "lungs"}, "unknown CT window"),  # with modality=mri too: a misspelt window is never meant
    ({"encoding": ""}, "unknown encoding"), ({"encoding": "br"}, "unknown encoding"),
    ({"image_size": 4096}, "from 64 to 2048"), ({"image_size": 100}, "multiple of 16"),
    ({"model": "sam3-huge"}, "unknown model")])
def test_the_server_refuses_what_the_description_leaves_out(params, fragment, token_server):
    answer = requests.post(token_server[0] + "/sessions", params={"model": "sam2.1-tiny", **params}, data=_nifti(),
                           headers=AUTH, timeout=60)
    assert answer.status_code == 400 and fragment in answer.json()["error"], answer.text


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/sessions", "GET, POST"), ("PATCH", "/sessions/abc", "DELETE, GET"), ("GET", "/jobs/x/cancel", "POST"),
    ("DELETE", "/health", "GET"), ("POST", "/openapi.json", "GET, HEAD")])
def test_a_405_lists_every_method_of_its_path(method, path, allowed, token_server):
    answer = requests.request(method, token_server[0] + path, headers=AUTH, timeout=30)
    assert answer.status_code == 405 and answer.headers["Allow"] == allowed
    assert set(answer.json()) == {"error", "code"}


# --- schemathesis ---------------------------------------------------------------------------------------------------
# The description cannot say that range_min goes with range_max and below it, that a name's suffix must match the
# body's format, nor that seed data must decode to the session's planes: a request it calls valid may still be
# refused there, with a 400 line (the other operations keep schemathesis' own list of acceptable answers).
_MAY_REFUSE_VALID = {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "404", "409"]}}}
EXAMPLES = 50  # an operation and phase (coverage enumerates its own cases)


def _schemathesis_config(url: str) -> "schemathesis.Config":
    return schemathesis.Config.from_dict({
        "seed": 21, "base-url": url, "headers": AUTH, "request-timeout": 60,
        "suppress-health-check": ["too_slow"],  # a loaded 2-core machine is slow, not wrong
        "generation": {"max-examples": EXAMPLES, "database": "none"},  # the same cases each run, nothing written
        "checks": {"enabled": True},  # every check: status codes, content types, bodies, headers, auth, methods...
        "operations": [{"include-path": "/sessions", "include-method": "POST", **_MAY_REFUSE_VALID},
                       {"include-path": "/sessions/{session_id}/propagate", "include-method": "POST",
                        **_MAY_REFUSE_VALID}]})


def _failures(event) -> list[str]:
    """One line per failed check of a finished scenario: operation, check, request, what was wrong."""
    lines = []
    for case_id, checks in event.recorder.checks.items():
        for check in checks:
            if check.failure_info is not None and check.status.value == "failure":
                case = event.recorder.cases[case_id].value
                failure = check.failure_info.failure
                lines.append(f"[{check.name}] {case.method} {case.formatted_path} {dict(case.query or {})}: "
                             f"{failure.title}: {failure.message.splitlines()[0] if failure.message else ''}")
    return lines


def test_every_answer_of_a_propagation_matches_the_description(spec, token_server):
    """The answers fuzzing cannot reach (a job done, a result's label map in each format, its table), each
    checked by every schemathesis check, the response schema and content type included."""
    schema = schemathesis.openapi.from_dict(spec, config=_schemathesis_config(token_server[0]))

    def call(method: str, path: str, **data):
        answer = schema[path][method].Case(**data).call_and_validate(headers=AUTH)
        assert answer.status_code < 300, answer.text
        return answer

    _, labels = synthetic_case(shape=SHAPE)
    opened = call("POST", "/sessions", query={"name": "image.nii.gz", "model": "sam2.1-tiny", "image_size": TINY_SIZE},
                  body=_nifti(), media_type="application/octet-stream").json()
    session = {"session_id": opened["session"]}
    plane = seeds_on(labels, {1: [5]})[5]
    job = call("POST", "/sessions/{session_id}/propagate", path_parameters=session,
               body={"slices": [slice_entry(5, plane)], "replace": True}).json()
    for _ in range(20):
        job = call("GET", "/jobs/{job_id}", path_parameters={"job_id": job["job"]}, query={"wait": 30}).json()
        if job["state"] in ("done", "failed", "cancelled"):
            break
    assert job["state"] == "done" and job["labels"] == [1], job
    call("POST", "/jobs/{job_id}/cancel", path_parameters={"job_id": job["job"]})
    raw = call("GET", "/sessions/{session_id}/labels", path_parameters=session, query={"format": "raw"}).json()
    assert raw["shape"] == [opened["slices"], opened["height"], opened["width"]]
    for fmt, media in (("nifti", "application/gzip"), ("nrrd", "application/octet-stream")):
        answer = call("GET", "/sessions/{session_id}/labels", path_parameters=session, query={"format": fmt})
        assert answer.headers["content-type"] == [media]
    answer = call("GET", "/sessions/{session_id}/confidence", path_parameters=session)
    assert answer.headers["content-type"][0].startswith("text/csv") and answer.text.startswith("# sslmedsam2")
    assert call("GET", "/sessions/{session_id}", path_parameters=session).json()["result"] == 1
    call("GET", "/sessions")
    call("GET", "/info")
    call("DELETE", "/sessions/{session_id}", path_parameters=session)


def test_the_server_keeps_its_description(spec, token_server):
    """Schemathesis' engine (what `schemathesis run` drives) with every check on every operation, all its phases
    (examples, coverage, fuzzing, stateful along the description's links), a bounded number of examples, the token
    given; an upload's body is a valid NIfTI. No 5xx, nothing undeclared."""
    from schemathesis.engine import events, from_schema

    schemathesis.openapi.media_type("application/octet-stream", hypothesis.strategies.just(_nifti()))
    schema = schemathesis.openapi.from_dict(spec, config=_schemathesis_config(token_server[0]))
    failures, errors, answered, phases = [], [], {}, set()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            failures += _failures(event)
            phases.add(event.phase.value)
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    answered[interaction.response.status_code] = answered.get(interaction.response.status_code, 0) + 1
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            errors.append(repr(getattr(event, "value", None) or getattr(event, "exception", event)))
    assert not errors, errors
    assert not failures, "\n".join(sorted(set(failures)))
    assert {"coverage", "fuzzing", "stateful"} <= phases, phases
    assert {200, 201, 400, 401, 404, 405} <= set(answered), answered  # the runs reached what they test
    assert not any(status >= 500 for status in answered), answered
