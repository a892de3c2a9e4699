"""The client in a Jupyter notebook, run by nbclient on a kernel of this interpreter
against a live server: the sync client, top-level ``await`` with the async one,
``wait_all(progress=True)`` as a widget, and the HTML display of a job and of a list
of jobs (issue 17)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from traitlets.config import Config

from support import LiveServer

KERNEL = "psik-api-tests"

CELLS = [
    # 0: the sync client, as a script would use it; $PSIK_API_URL says where.
    """\
from psik_api_client import AsyncClient, Client

with Client() as api:
    job = api.submit({"name": "nb-sync", "script": "echo hello"})
    job = api.wait(job.jobid, timeout=60)
print(job.state.value, job.name)""",
    # 1: the job alone: its HTML display.
    "job",
    # 2: top-level await (the kernel's own event loop) and a progress bar.
    """\
async with AsyncClient() as aapi:
    new = [await aapi.submit({"name": f"nb-async-{n}", "script": f"exit {n}"}) for n in range(3)]
    jobs = await aapi.wait_all(new, timeout=60, progress=True)
", ".join(f"{j.name} {j.state.value}" for j in jobs)""",
    # 3: the list wait_all returned: one table.
    "jobs",
]


@pytest.fixture
def jupyter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jupyter's and IPython's files in tmp_path, with a kernel spec there for ipykernel
    on this very interpreter (not whatever kernel "python3" names on this machine)."""
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    spec = tmp_path / "jupyter_data_dir" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel_json = {"argv": argv, "display_name": KERNEL, "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel_json))


def outputs(cell: Any, kind: str) -> list[Any]:
    return [out for out in cell.outputs if out.output_type == kind]


def test_a_notebook_submits_waits_and_shows_jobs(
    live_app: LiveServer, jupyter: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PSIK_API_URL", live_app.url)  # the kernel inherits the environment
    monkeypatch.delenv("PSIK_API_UDS", raising=False)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    # ipc: the kernel's channels are UNIX sockets in tmp_path, not TCP ports. The
    # client starts the kernel and shuts it down at the end, whatever happens.
    config = Config({"KernelManager": {"transport": "ipc"}})
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=120, store_widget_state=True, config=config)
    client.execute()
    sync, one, many, table = nb.cells

    # The sync client: submitted, waited for, final.
    assert [out.text for out in outputs(sync, "stream")] == ["completed nb-sync\n"]

    # A job's own display: its name and state in the HTML, a readable repr beside it.
    (shown,) = outputs(one, "execute_result")
    html = shown.data["text/html"]
    assert "nb-sync" in html and "completed" in html and html.count("<table") == 1
    assert "nb-sync" in shown.data["text/plain"]

    # Top-level await: the async client's jobs, each final as its script said.
    (result,) = outputs(many, "execute_result")
    assert result.data["text/plain"] == "'nb-async-0 completed, nb-async-1 failed, nb-async-2 failed'"
    # progress=True in Jupyter: tqdm.auto's widget, at 3 of 3 once done.
    (bar,) = outputs(many, "display_data")
    assert "application/vnd.jupyter.widget-view+json" in bar.data
    widgets = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    counts = [w["state"] for w in widgets.values() if w["model_name"] == "FloatProgressModel"]
    assert [(c["value"], c["max"]) for c in counts] == [(3, 3)]
    # (tqdm's widget spaces its text with U+2007, figure spaces.)
    labels = [w["state"]["value"] for w in widgets.values() if w["model_name"] == "HTMLModel"]
    assert "100%" in labels and any(" 3/3 final [" in x.replace("\u2007", " ") for x in labels)
    assert not outputs(many, "error") and not outputs(many, "stream")  # no text bar, no warning

    # The list wait_all returned: one table, a row for each job.
    (listed,) = outputs(table, "execute_result")
    html = listed.data["text/html"]
    assert html.count("<table") == 1
    assert all(f"nb-async-{n}" in html for n in range(3))
    assert "completed" in html and "failed" in html
