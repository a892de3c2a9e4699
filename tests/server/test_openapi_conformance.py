"""What the server answers matches what /openapi.json says it answers: each response's
status is documented for its operation, and its body validates against that schema; and
the routes the app has are the operations the document lists, no more and no fewer."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from psik_api_server.http.routes import Resource

pytestmark = pytest.mark.anyio


def _operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    for template, ops in doc["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in ops:
            return ops[method.lower()]  # type: ignore[no-any-return]
    raise AssertionError(f"{method} {path} is not documented")


def _check(doc: dict[str, Any], r: httpx.Response) -> None:
    op = _operation(doc, r.request.method, r.request.url.path)
    assert str(r.status_code) in op["responses"], (r.request.method, r.request.url.path, r.status_code)
    content = op["responses"][str(r.status_code)].get("content")
    if r.status_code == 204:
        assert not content and not r.content
        return
    media = r.headers["content-type"].split(";")[0]
    assert content is not None and media in content, (r.request.url.path, media, list(content or {}))
    schema = {**content[media]["schema"], "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(r.json())


async def test_responses_match_the_document(http: httpx.AsyncClient) -> None:
    doc = (await http.get("/openapi.json")).json()
    job = await http.post(
        "/v1/jobs", json={"name": "doc", "script": "sleep 30"}, headers={"Idempotency-Key": "a"}
    )
    jobid = job.json()["jobid"]
    new = await http.post("/v1/jobs/new", json={"script": "true", "cb_secret": "s"})
    responses = [
        job,
        new,
        await http.post(f"/v1/jobs/{jobid}/start"),  # 409
        await http.get("/v1/jobs", params={"limit": 1}),
        await http.get("/v1/jobs", params=[("id", jobid), ("state", "queued"), ("state", "active")]),
        await http.get(f"/v1/jobs/{jobid}"),
        await http.get(f"/v1/jobs/{jobid}/state"),
        await http.delete(f"/v1/jobs/{jobid}"),
        await http.delete(f"/v1/jobs/{jobid}", params={"purge": "true"}),
        await http.get(f"/v1/jobs/{jobid}"),  # 404
        await http.get("/v1/jobs/x.y"),  # 422
        await http.get("/v1/jobs", params={"limit": 0}),  # 422
        await http.post("/v1/jobs", json={"script": "true", "backend": "nope"}),  # 422
        await http.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"}),  # 400
        await http.post("/v1/jobs", content=b"{}", headers={"Content-Type": "text/plain"}),  # 415
        await http.post("/v1/jobs", json={"script": "#!/no/such/shell\n"}),  # 502
        await http.get("/v1/backends"),
        await http.get("/v1/backends/default"),
        await http.get("/v1/backends/nope"),
        await http.get("/healthz"),
    ]
    assert [r.status_code for r in responses] == [
        201, 201, 409, 200, 200, 200, 200, 200, 204, 404, 422, 422, 422, 400, 415, 502, 200, 200, 404, 200,
    ]  # fmt: skip
    for r in responses:
        _check(doc, r)


# Values for the path parameters, to send a request to each route.
_EXAMPLES = {"jobid": "1693992878.203", "name": "default", "path": "data.txt", "group": "0" * 32}


async def test_routes_are_the_documents_operations(http: httpx.AsyncClient, app: Starlette) -> None:
    """What the app routes (walking app.routes) is what /openapi.json documents, path by
    path and method by method, and each path's 405 names exactly its documented methods."""
    doc = (await http.get("/openapi.json")).json()
    documented = {path: {m.upper() for m in ops} for path, ops in doc["paths"].items()}
    routed: dict[str, set[str]] = {}
    for route in app.routes:
        assert isinstance(route, Route) and isinstance(route.app, Resource), route
        assert route.path not in routed, f"{route.path} is routed twice"
        # A file path is routed as {path:path} (it may hold "/"), documented as {path}.
        routed[route.path.replace(":path}", "}")] = set(route.app.handlers)
    assert routed == documented
    for path, methods in documented.items():
        url = re.sub(r"\{([^}]+)\}", lambda m: _EXAMPLES[m.group(1)], path)
        # No operation uses OPTIONS: every path answers it with its Allow header.
        r = await http.request("OPTIONS", url)
        assert r.status_code == 405, (path, r.text)
        allowed = set(r.headers["allow"].split(", "))
        assert allowed == methods | ({"HEAD"} if "GET" in methods else set()), path
