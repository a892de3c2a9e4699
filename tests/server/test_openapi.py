"""The OpenAPI document describes docs/http-api.md, and the docs page renders it safely."""

from __future__ import annotations

import html
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from pydantic import ValidationError

from psik_api_core import JOBID_PATTERN, LIMITS, STRICT_INPUT, Job, JobSpec, JobState, ResourceSpec
from psik_api_core.limits import byte_size
from psik_api_server.http.docs import docs_html
from psik_api_server.http.openapi import build_openapi

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"
JOB_ROUTES = [
    ("post", "/v1/jobs/{jobid}/start"),
    ("get", "/v1/jobs/{jobid}"),
    ("delete", "/v1/jobs/{jobid}"),
    ("get", "/v1/jobs/{jobid}/state"),
]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_openapi(backends=["local", "slurm"])


def _op(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = doc["paths"][path][method]
    return op


def _param(op: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [p for p in op.get("parameters", []) if p["name"] == name]
    assert len(found) == 1, (name, found)
    return found[0]


def _walk(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _pointer(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _schema_validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    # The components ride along in the root so that "#/components/..." refs resolve.
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(root)


# ---- the document ----


@pytest.mark.parametrize("backends", [None, ["local", "slurm"]])
def test_document_is_valid_openapi_3_1(backends: list[str] | None) -> None:
    doc = build_openapi(title="my jobs", version="9.9", backends=backends)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "my jobs"
    assert doc["info"]["version"] == "9.9"
    assert doc["info"]["description"].strip()
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_every_ref_resolves_and_defs_are_hoisted(doc: dict[str, Any]) -> None:
    refs = [node["$ref"] for node in _walk(doc) if isinstance(node, dict) and "$ref" in node]
    assert len(refs) > 20
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert isinstance(_pointer(doc, ref), dict), ref
    assert not [node for node in _walk(doc) if isinstance(node, dict) and "$defs" in node]


def test_every_contract_route_is_documented(doc: dict[str, Any]) -> None:
    rows = re.findall(r"^\| (GET|POST|DELETE|PUT|PATCH) `([^`]+)`", CONTRACT.read_text(), re.MULTILINE)
    assert len(rows) == 30

    def shape(path: str) -> str:  # the contract writes {id} where the document names it {jobid}
        return re.sub(r"\{[^}]+\}", "{}", path)

    documented = {(m, shape(p)) for p, item in doc["paths"].items() for m in item}
    for method, path in rows:
        assert (method.lower(), shape(path)) in documented, f"{method} {path}"
    assert len(documented) == len(rows)
    op_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(op_ids) == len(set(op_ids))


def test_contract_page_states_the_limits() -> None:
    """docs/http-api.md states core's LIMITS, which the document and the server use."""
    text = CONTRACT.read_text()
    assert f"<= {LIMITS.max_idempotency_key} chars" in text
    assert f"up to {LIMITS.max_ids})" in text
    assert f"`limit` (1..{LIMITS.max_page_size}, default {LIMITS.default_page_size})" in text
    assert f"body over {byte_size(LIMITS.max_body_bytes)} is 413" in text


def test_jobid_pattern_is_anchored_and_strict(doc: dict[str, Any]) -> None:
    for method, path in JOB_ROUTES:
        param = _param(_op(doc, method, path), "jobid")
        assert param["in"] == "path"
        assert param["required"] is True
        assert param["schema"]["pattern"] == f"^{JOBID_PATTERN}$"
    pattern = _param(_op(doc, "get", "/v1/jobs/{jobid}"), "jobid")["schema"]["pattern"]
    inner = pattern.removeprefix("^").removesuffix("$")
    for bad in ["1.2\n", "../1", "1.2.3", "", "1.", "abc", "1 2"]:
        assert re.fullmatch(inner, bad) is None, repr(bad)
    for good in ["1693992878.203", "1693992878", "0.5"]:
        assert re.fullmatch(inner, good), good
    # The ids the API returns and takes in lists carry the same pattern.
    schemas = doc["components"]["schemas"]
    for name in ("Job", "JobSummary", "JobStatus"):
        assert schemas[name]["properties"]["jobid"]["pattern"] == pattern
    assert _param(_op(doc, "get", "/v1/jobs"), "id")["schema"]["items"]["pattern"] == pattern


def test_list_query_parameters(doc: dict[str, Any]) -> None:
    op = _op(doc, "get", "/v1/jobs")
    names = {p["name"] for p in op["parameters"]}
    assert names == {"state", "backend", "name", "id", "limit", "cursor", "label", "group", "view"}
    assert all(p["in"] == "query" and not p["required"] for p in op["parameters"])
    state = _param(op, "state")
    assert state["schema"]["type"] == "array"
    assert state["explode"] is True
    assert state["schema"]["items"]["enum"] == [s.value for s in JobState]
    ids = _param(op, "id")
    assert ids["explode"] is True
    assert ids["schema"]["maxItems"] == LIMITS.max_ids
    assert f"up to {LIMITS.max_ids} ids" in ids["description"]
    limit = _param(op, "limit")["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"], limit["default"]) == (
        "integer",
        1,
        LIMITS.max_page_size,
        LIMITS.default_page_size,
    )
    assert _param(op, "backend")["schema"]["examples"] == ["local", "slurm"]
    page = op["responses"]["200"]["content"]["application/json"]["schema"]
    items = _pointer(doc, page["$ref"])["properties"]["items"]
    # A summary, or with view=full the whole job.
    assert items["items"]["anyOf"] == [
        {"$ref": "#/components/schemas/Job"},
        {"$ref": "#/components/schemas/JobSummary"},
    ]
    # A list item carries its job's exit code: no request per job to show it.
    exit_code = doc["components"]["schemas"]["JobSummary"]["properties"]["exit_code"]
    assert exit_code["anyOf"] == [{"type": "integer"}, {"type": "null"}]


def test_delete_can_purge(doc: dict[str, Any]) -> None:
    op = _op(doc, "delete", "/v1/jobs/{jobid}")
    purge = _param(op, "purge")
    assert (purge["in"], purge["schema"]["type"]) == ("query", "boolean")
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Job")
    assert "content" not in op["responses"]["204"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/new"])
def test_job_creation_takes_jobspec_and_idempotency_key(doc: dict[str, Any], path: str) -> None:
    op = _op(doc, "post", path)
    key = _param(op, "Idempotency-Key")
    assert key["in"] == "header"
    assert key["required"] is False
    assert key["schema"]["maxLength"] == LIMITS.max_idempotency_key
    assert op["requestBody"]["required"] is True
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobSpec"
    }
    created = op["responses"]["201"]
    assert created["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Job"}
    assert "Location" in created["headers"]
    assert {"400", "409", "413", "422"} <= set(op["responses"])
    assert f"over {byte_size(LIMITS.max_body_bytes)}" in op["responses"]["413"]["description"]
    assert "Retry-After" in op["responses"]["409"]["headers"]
    assert ("502" in op["responses"]) is (path == "/v1/jobs")
    assert "insufficient_storage" in op["responses"]["507"]["description"]


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/v1/jobs", {"400", "409", "413", "415", "422", "502", "503", "507"}),
        ("post", "/v1/jobs/new", {"400", "409", "413", "415", "422", "503", "507"}),
        ("post", "/v1/jobs/{jobid}/start", {"404", "409", "422", "502", "503", "507"}),
        ("get", "/v1/jobs", {"422"}),
        ("get", "/v1/jobs/{jobid}", {"404", "409", "422"}),
        ("delete", "/v1/jobs/{jobid}", {"404", "409", "422", "503", "507"}),
        ("get", "/v1/jobs/{jobid}/state", {"404", "422"}),
        ("get", "/v1/backends/{name}", {"404"}),
    ],
)
def test_errors_are_documented_as_problems(
    doc: dict[str, Any], method: str, path: str, statuses: set[str]
) -> None:
    responses = _op(doc, method, path)["responses"]
    assert {s for s in responses if int(s) >= 400} == statuses
    problem = _schema_validator(doc, "Problem")
    for status in statuses:
        content = responses[status]["content"]
        assert set(content) == {"application/problem+json"}
        assert content["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
        for example in content["application/problem+json"]["examples"].values():
            problem.validate(example["value"])
            assert str(example["value"]["status"]) == status


def test_every_error_response_is_problem_json(doc: dict[str, Any]) -> None:
    for item in doc["paths"].values():
        for op in item.values():
            for status, response in op["responses"].items():
                as_problem = "application/problem+json" in response.get("content", {})
                assert as_problem is (int(status) >= 400), (op["operationId"], status)


def test_job_schemas_match_core(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert set(schemas["Job"]["properties"]) == set(Job.model_fields)
    assert {"native_id", "exit_code"} <= set(schemas["Job"]["properties"])


def test_jobspec_request_schema_matches_core(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    spec = schemas["JobSpec"]
    assert spec["required"] == ["script"]
    assert set(spec["properties"]) == set(JobSpec.model_fields)
    assert set(schemas["ResourceSpec"]["properties"]) == set(ResourceSpec.model_fields)
    # The server validates bodies with STRICT_INPUT, so the document forbids unknown
    # fields at every level, as the server does.
    for name in ("JobSpec", "ResourceSpec"):
        assert schemas[name]["additionalProperties"] is False


@pytest.mark.parametrize(
    "body",
    [
        {"script": "echo hi"},
        {"name": None, "script": "#!/bin/sh\necho hi", "backend": "local", "inherit_environment": False},
        {
            "name": "big",
            "directory": "/scratch/run",
            "script": "srun ./app",
            "environment": {"OMP_NUM_THREADS": "4"},
            "resources": {
                "duration": 60,
                "node_count": 2,
                "process_count": 8,
                "processes_per_node": 4,
                "cpu_cores_per_process": 2,
                "gpu_cores_per_process": 1,
                "exclusive_node_use": False,
            },
            "attributes": {"constraint": "gpu"},
            "callback": "https://example.org/hook",
            "cb_headers": {"X-Token": "t"},
            "cb_secret": "s3cret",
        },
        {"script": "true", "resources": {}, "callback": None, "cb_secret": None},
    ],
)
def test_jobspec_schema_accepts_what_core_accepts(doc: dict[str, Any], body: dict[str, Any]) -> None:
    JobSpec.model_validate(body, context=STRICT_INPUT)
    _schema_validator(doc, "JobSpec").validate(body)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "no script"},
        {"script": "x", "resources": {"duration": "long"}},
        {"script": ["x"]},
        {"script": "x", "scrpit": "typo"},
        {"script": "x", "resources": {"nodes": 2}},
    ],
)
def test_jobspec_schema_rejects_what_core_rejects(doc: dict[str, Any], body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate(body, context=STRICT_INPUT)
    assert list(_schema_validator(doc, "JobSpec").iter_errors(body))


def test_the_table_needs_no_web_framework() -> None:
    """The operations table is data: reading it (the client, tools) pulls in no server."""
    code = "import sys; sys.modules.update(starlette=None, psik=None); import psik_api_server.http.openapi"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_call_builds_a_fresh_document() -> None:
    first = build_openapi()
    first["components"]["schemas"]["JobSpec"]["required"].append("name")
    first["paths"].clear()
    second = build_openapi()
    assert second["components"]["schemas"]["JobSpec"]["required"] == ["script"]
    assert "/v1/jobs" in second["paths"]


# ---- the docs page ----


@pytest.fixture(scope="module")
def page(doc: dict[str, Any]) -> str:
    return docs_html(doc)


def _curl_blocks(page: str) -> list[str]:
    return [html.unescape(b) for b in re.findall(r'<pre class="curl">(.*?)</pre>', page, re.DOTALL)]


def test_page_needs_no_internet_and_runs_no_code(page: str) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE)  # no event handler attributes
    outside_examples = re.sub(r'<pre class="curl">.*?</pre>', "", page, flags=re.DOTALL)
    assert not re.search(r"https?://", outside_examples, re.IGNORECASE)
    urls = [u for block in _curl_blocks(page) for u in re.findall(r"https?://\S+", block)]
    assert urls
    assert all(u.startswith("http://127.0.0.1:") for u in urls), urls
    for target in re.findall(r"""(?:href|src|action)\s*=\s*["']([^"']*)""", page, re.IGNORECASE):
        assert target.startswith(("#", "/")) and not target.startswith("//"), target
    assert 'href="/openapi.json"' in page


def test_page_links_resolve(page: str) -> None:
    ids = set(re.findall(r'id="([^"]+)"', page))
    anchors = re.findall(r'href="#([^"]+)"', page)
    assert anchors
    assert [a for a in anchors if a not in ids] == []


def test_page_shows_every_operation_and_the_request_fields(doc: dict[str, Any], page: str) -> None:
    text = html.unescape(page)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert f"{method.upper()}</span><code>{path}</code> {op['summary']}" in text
            for param in op.get("parameters", []):
                assert f"<code>{param['name']}</code>" in text
    for field in JobSpec.model_fields:
        assert f"<code>{field}</code>" in text
    assert "<code>resources.duration</code>" in text  # nested $ref expanded
    assert "Shell / shebang script to execute" in text  # the field's title
    assert "^" + JOBID_PATTERN + "$" in text


def test_curl_examples_are_copy_pasteable(page: str) -> None:
    blocks = _curl_blocks(page)
    submit = [shlex.split(b) for b in blocks if "-X POST http://127.0.0.1:8000/v1/jobs " in b]
    assert len(submit) == 1
    argv = submit[0]
    assert argv[:4] == ["curl", "-X", "POST", "http://127.0.0.1:8000/v1/jobs"]
    assert argv[argv.index("-H") + 1] == "Content-Type: application/json"
    body = json.loads(argv[argv.index("-d") + 1])
    JobSpec.model_validate(body, context=STRICT_INPUT)

    listing = [shlex.split(b) for b in blocks if re.match(r"curl '?http://127.0.0.1:8000/v1/jobs\?", b)]
    assert len(listing) == 1
    url = urlsplit(listing[0][1])
    query = parse_qs(url.query)
    assert url.path == "/v1/jobs"
    assert set(query["state"]) <= {s.value for s in JobState}
    assert 1 <= int(query["limit"][0]) <= 1000


def test_page_escapes_what_the_document_says() -> None:
    doc = build_openapi(title='</title><script>alert("t")</script>')
    evil = "<img src=x onerror=1>"
    doc["paths"]["/healthz"]["get"]["summary"] = evil
    doc["paths"]["/healthz"]["get"]["description"] = evil
    doc["paths"]["/v1/jobs"]["get"]["parameters"][0]["description"] = evil
    doc["components"]["schemas"]["JobSpec"]["properties"]["script"]["title"] = evil
    doc["tags"][0]["description"] = evil
    page = docs_html(doc)
    assert "<img" not in page
    assert "<script" not in page.lower()
    assert page.count(html.escape(evil)) >= 5
    assert html.escape("</title><script>") in page
