"""Backend drivers are found in a registry by type name (psik_api_server.backends): a
driver registered under a new type name is what the server uses for that type's jobs
(create, submit, cancel, health, liveness), with no other module told about it; every
type without a driver of its own gets the plain-psik driver."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from psik_api_core import JobSpec
from psik_api_server.app import create_app
from psik_api_server.backends import DRIVERS, BackendDriver, Finding, driver_class, register
from psik_api_server.backends.local import LocalDriver
from psik_api_server.backends.local.launcher import LocalLauncher
from psik_api_server.backends.psik_plain import PsikDriver
from psik_api_server.backends.slurm import SlurmDriver
from psik_api_server.jobs.callbacks import CallbackRecord
from psik_api_server.jobs.store import JobRow
from psik_api_server.settings import BackendSettings, Settings

pytestmark = pytest.mark.anyio

#: What the toy driver was asked, in order: (method, argument).
CALLS: list[tuple[str, Any]] = []


class ToyDriver(BackendDriver):
    """A scheduler that runs nothing: it records what it is asked, and the rows psik
    would have written."""

    psik_type = "local"  # psik has no "toy" module: it writes the job's files as a local one's

    def load(self) -> str | None:
        CALLS.append(("load", sorted(self.backends)))
        return super().load()

    async def health(self, name: str) -> str | None:
        CALLS.append(("health", name))
        return "the toy scheduler is asleep" if name == "sleepy" else None

    async def create(self, spec: JobSpec, record: CallbackRecord | None) -> str:
        jobid = await super().create(spec, record)
        CALLS.append(("create", jobid))
        return jobid

    async def submit(self, job: Any, jobndx: int, waited: int | None) -> tuple[int, str]:
        from psik.models import JobState

        CALLS.append(("submit", job.stamp))
        await job.reached(jobndx, JobState.queued, "toy-1")
        return jobndx, "toy-1"

    async def cancel(self, job: Any) -> None:
        from psik.models import JobState

        CALLS.append(("cancel", job.stamp))
        await job.reached(0, JobState.canceled)

    async def vanished(self, rows: Sequence[JobRow]) -> list[Finding]:
        CALLS.append(("vanished", sorted(r.jobid for r in rows)))
        return []


@pytest.fixture
def toy() -> Iterator[None]:
    driver_class("local")  # the built-in drivers are registered first
    register("toy")(ToyDriver)
    CALLS.clear()
    yield
    del DRIVERS["toy"]


def test_each_type_has_its_driver_and_every_other_type_the_plain_psik_one() -> None:
    assert driver_class("local") is LocalDriver
    assert driver_class("slurm") is SlurmDriver
    assert driver_class("nersc") is PsikDriver and driver_class("globus") is PsikDriver
    assert BackendSettings(type="local").slot_limit() is not None  # the CPU count
    assert BackendSettings(type="nersc").slot_limit() is None


async def test_a_driver_registered_under_a_new_type_name_is_used(toy: None, tmp_path: Path) -> None:
    backends: Mapping[str, BackendSettings] = {
        "default": BackendSettings(type="toy"),
        "sleepy": BackendSettings(type="toy"),
    }
    settings = Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        backends=dict(backends),
        watch_interval=0.02,
    )
    app = create_app(settings, launcher=LocalLauncher(tmp_path / "launcher.log", eager=False))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http,
    ):
        # The liveness loop's first round may already have asked (vanished) by now.
        assert [c for c in CALLS if c != ("vanished", [])] == [("load", ["default", "sleepy"])]
        infos = {b["name"]: b for b in (await http.get("/v1/backends")).json()}
        assert infos["default"]["type"] == "toy" and infos["default"]["healthy"]
        assert infos["sleepy"]["detail"] == "the toy scheduler is asleep"

        created = await http.post("/v1/jobs", json={"script": "true", "backend": "default"})
        assert created.status_code == 201, created.text
        job = created.json()
        jobid = job["jobid"]
        assert job["state"] == "queued" and job["native_id"] == "toy-1"
        assert ("create", jobid) in CALLS and ("submit", jobid) in CALLS

        assert await app.state.context.service.check_liveness() == []
        assert ("vanished", [jobid]) in CALLS  # the index rows of its jobs, handed over

        assert (await http.delete(f"/v1/jobs/{jobid}")).status_code < 300
        assert ("cancel", jobid) in CALLS
        assert (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] == "canceled"
        assert not app.state.context.service.backend._launcher.running  # no local job: no launcher
