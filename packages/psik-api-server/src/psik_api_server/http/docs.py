"""The API documentation page served at ``/``: the OpenAPI document rendered as HTML.

The page is self-contained (inline CSS, no JavaScript, no external URL) so it works on a
login node without internet access. Every string from the document is escaped: the
document is data, and part of it (titles, backend names) comes from configuration.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Iterator
from html import escape
from typing import Any

#: Where the curl examples send their requests (the server's default address).
EXAMPLE_BASE_URL = "http://127.0.0.1:8000"
_EXAMPLE_JOB = {"name": "hello", "script": "echo hello"}
_EXAMPLE_JOBID = "1693992878.203"
_METHODS = ("get", "post", "put", "patch", "delete")

_CURL: dict[tuple[str, str], list[str]] = {
    ("post", "/v1/jobs"): [
        *("curl", "-X", "POST", f"{EXAMPLE_BASE_URL}/v1/jobs"),
        *("-H", "Content-Type: application/json", "-d", json.dumps(_EXAMPLE_JOB)),
    ],
    ("post", "/v1/jobs/new"): [
        *("curl", "-X", "POST", f"{EXAMPLE_BASE_URL}/v1/jobs/new"),
        *("-H", "Content-Type: application/json", "-d", json.dumps(_EXAMPLE_JOB)),
    ],
    ("get", "/v1/jobs"): ["curl", f"{EXAMPLE_BASE_URL}/v1/jobs?state=queued&state=active&limit=10"],
    ("get", "/v1/jobs/{jobid}/state"): ["curl", f"{EXAMPLE_BASE_URL}/v1/jobs/{_EXAMPLE_JOBID}/state"],
    ("delete", "/v1/jobs/{jobid}"): ["curl", "-X", "DELETE", f"{EXAMPLE_BASE_URL}/v1/jobs/{_EXAMPLE_JOBID}"],
}

_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 62rem; margin: 0 auto; padding: 1rem 2rem;
       color: #1d232a; }
h1 { margin-bottom: 0; } h2 { border-bottom: 2px solid #d0d7de; margin-top: 2.5rem; }
h3 { margin: 0; font-size: 1.05rem; } h4 { margin: 1rem 0 .3rem; }
code, pre { font: 13px/1.4 ui-monospace, monospace; }
p code, td code, li code { background: #f0f2f4; padding: 0 .25em; border-radius: 3px; }
pre { background: #1d232a; color: #e8ecef; padding: .7rem 1rem; border-radius: 6px; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; margin: .3rem 0; }
th, td { text-align: left; vertical-align: top; padding: .3rem .5rem; border-bottom: 1px solid #e1e4e8; }
th { font-size: .8rem; text-transform: uppercase; color: #57606a; }
.op { border: 1px solid #d0d7de; border-radius: 8px; padding: .8rem 1.1rem; margin: 1rem 0; }
.method { display: inline-block; min-width: 4.5rem; text-align: center; border-radius: 4px;
          color: #fff; font-weight: 600; font-size: .8rem; padding: .1rem .4rem; margin-right: .5rem; }
.get { background: #1f6feb; } .post { background: #1a7f37; } .delete { background: #cf222e; }
.put, .patch { background: #9a6700; }
.muted { color: #57606a; } .req { color: #cf222e; font-size: .8rem; }
"""


def docs_html(openapi: dict[str, Any]) -> str:
    """The OpenAPI document as a self-contained HTML page of API documentation."""
    info = openapi.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    schemas: dict[str, Any] = openapi.get("components", {}).get("schemas", {})
    ops = list(_operations(openapi))
    about = {t["name"]: t.get("description", "") for t in openapi.get("tags", [])}
    tags = list(about) + sorted({t for _, _, op in ops for t in op.get("tags", ["other"])} - set(about))
    body: list[str] = [
        f"<h1>{escape(title)}</h1>",
        _paragraphs(info.get("description", "")),
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> '
        f"(OpenAPI {escape(str(openapi.get('openapi', '')))}).</p>",
        _contents(tags, ops),
    ]
    for tag in tags:
        tagged = [(p, m, op) for p, m, op in ops if tag in op.get("tags", ["other"])]
        if tagged:
            body.append(f'<h2 id="tag-{escape(tag)}">{escape(tag)}</h2>' + _paragraphs(about.get(tag, "")))
            body += [_operation(path, method, op, schemas) for path, method, op in tagged]
    body.append('<h2 id="schemas">Schemas</h2>')
    body += [_schema_section(name, schema, schemas) for name, schema in schemas.items()]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _operations(openapi: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in openapi.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                yield path, method, item[method]


def _anchor(method: str, path: str) -> str:
    return "op-" + method + "-" + re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-")


def _text(text: str) -> str:
    """Escaped text, with Markdown's `code` spans kept as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{_text(p)}</p>" for p in text.split("\n\n") if p.strip())


def _contents(tags: list[str], ops: list[tuple[str, str, dict[str, Any]]]) -> str:
    items = [
        f'<li><a href="#{_anchor(method, path)}"><code>{escape(method.upper())} {escape(path)}</code></a>'
        f" {escape(op.get('summary', ''))}</li>"
        for tag in tags
        for path, method, op in ops
        if tag in op.get("tags", ["other"])
    ]
    return "<h2>Contents</h2><ul>" + "".join(items) + '<li><a href="#schemas">Schemas</a></li></ul>'


def _operation(path: str, method: str, op: dict[str, Any], schemas: dict[str, Any]) -> str:
    out = [
        f'<section class="op" id="{_anchor(method, path)}">',
        f'<h3><span class="method {escape(method)}">{escape(method.upper())}</span>'
        f"<code>{escape(path)}</code> {escape(op.get('summary', ''))}</h3>",
        _paragraphs(op.get("description", "")),
    ]
    if params := op.get("parameters"):
        out += ["<h4>Parameters</h4>", _parameters(params, schemas)]
    if request := op.get("requestBody"):
        for media, content in request.get("content", {}).items():
            schema = content.get("schema", {})
            out.append(
                f"<h4>Request body <span class='muted'>{escape(media)}</span>: {_type(schema, schemas)}</h4>"
            )
            out.append(_fields(schema, schemas, expand=True))
    out += ["<h4>Responses</h4>", _responses(op.get("responses", {}), schemas)]
    if (argv := _CURL.get((method, path))) is not None:
        out += ["<h4>Example</h4>", f'<pre class="curl">{escape(shlex.join(argv))}</pre>']
    out.append("</section>")
    return "\n".join(out)


def _parameters(params: list[dict[str, Any]], schemas: dict[str, Any]) -> str:
    rows = [
        (
            f"<code>{escape(p['name'])}</code>"
            + (' <span class="req">required</span>' if p.get("required") else ""),
            escape(p.get("in", "")),
            _type(p.get("schema", {}), schemas),
            _default(p.get("schema", {})),
            _text(p.get("description", "")),
        )
        for p in params
    ]
    return _table(("name", "in", "type", "default", "description"), rows)


def _responses(responses: dict[str, Any], schemas: dict[str, Any]) -> str:
    rows = []
    for status, response in responses.items():
        bodies = [
            f"<code>{escape(media)}</code> {_type(content.get('schema', {}), schemas)}"
            for media, content in response.get("content", {}).items()
        ]
        headers = [f"header <code>{escape(h)}</code>" for h in response.get("headers", {})]
        rows.append(
            (
                f"<b>{escape(str(status))}</b>",
                _text(response.get("description", "")),
                "<br>".join(bodies + headers),
            )
        )
    return _table(("status", "when", "body"), rows)


def _table(head: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    """A table of already-escaped cells."""
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table>"


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        resolved: dict[str, Any] = schemas.get(ref.rsplit("/", 1)[-1], {})
        return resolved
    return schema


def _type(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    """A schema's type as escaped HTML, named schemas linked to their section."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        shown = str(schemas.get(name, {}).get("title", name))  # "Page[JobSummary]", not "Page_JobSummary_"
        return f'<a href="#schema-{escape(name)}">{escape(shown)}</a>'
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_type(s, schemas) for s in schema[key])
    if "const" in schema:
        return f"<code>{escape(json.dumps(schema['const']))}</code>"
    if "enum" in schema:
        return " | ".join(f"<code>{escape(json.dumps(v))}</code>" for v in schema["enum"])
    kind = schema.get("type", "any")
    kinds = kind if isinstance(kind, list) else [kind]
    parts = []
    for k in kinds:
        if k == "array":
            parts.append("array of " + _type(schema.get("items", {}), schemas))
        elif k == "object" and isinstance(schema.get("additionalProperties"), dict):
            parts.append("map of string to " + _type(schema["additionalProperties"], schemas))
        else:
            parts.append(
                escape(str(k)) + (f" ({escape(str(schema['format']))})" if "format" in schema else "")
            )
    return " | ".join(parts) + _constraints(schema)


def _constraints(schema: dict[str, Any]) -> str:
    named = {
        "minimum": "min",
        "maximum": "max",
        "minLength": "min length",
        "maxLength": "max length",
        "maxItems": "max items",
        "pattern": "pattern",
    }
    found = [
        f"{label} <code>{escape(str(schema[key]))}</code>" for key, label in named.items() if key in schema
    ]
    return f' <span class="muted">{", ".join(found)}</span>' if found else ""


def _default(schema: dict[str, Any]) -> str:
    return f"<code>{escape(json.dumps(schema['default']))}</code>" if "default" in schema else ""


def _fields(schema: dict[str, Any], schemas: dict[str, Any], *, expand: bool) -> str:
    """The fields of an object schema as a table; with ``expand``, nested objects' fields too."""
    rows = list(_field_rows(schema, schemas, "", frozenset() if expand else None))
    return _table(("field", "type", "default", "description"), rows)


def _field_rows(
    schema: dict[str, Any], schemas: dict[str, Any], prefix: str, seen: frozenset[str] | None
) -> Iterator[tuple[str, ...]]:
    """Rows of field, type, default, description; ``seen`` (None: no expansion) stops cycles."""
    name = str(schema.get("$ref", "")).rsplit("/", 1)[-1]
    target = _resolve(schema, schemas)
    required = set(target.get("required", []))
    for field, sub in target.get("properties", {}).items():
        label = f"<code>{escape(prefix + field)}</code>"
        if field in required:
            label += ' <span class="req">required</span>'
        about = sub.get("description") or sub.get("title") or ""
        yield label, _type(sub, schemas), _default(sub), _text(str(about))
        nested = str(sub.get("$ref", "")).rsplit("/", 1)[-1]
        if (
            seen is not None
            and nested
            and nested not in seen | {name}
            and _resolve(sub, schemas).get("properties")
        ):
            yield from _field_rows(sub, schemas, f"{prefix}{field}.", seen | {name})


def _schema_section(name: str, schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    head = f'<h3 id="schema-{escape(name)}">{escape(str(schema.get("title", name)))}</h3>'
    about = _paragraphs(str(schema.get("description", "")))
    if schema.get("properties"):
        return head + about + _fields(schema, schemas, expand=False)
    return head + about + f"<p>{_type(schema, schemas)}</p>"
