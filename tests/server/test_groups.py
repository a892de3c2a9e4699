"""POST /v1/groups (issue 18): many jobs in one request, all or nothing, idempotent and
crash-safe; GET /v1/groups/{id} with the members' states; DELETE cancels the members;
GET /v1/jobs?group=... lists them. Real local jobs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_core import Principal
from psik_api_server.context import context
from psik_api_server.jobs.groups import GroupLog, GroupService
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio
FINAL = {"completed", "failed", "canceled"}


@asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c, app


async def _all_final(c: httpx.AsyncClient, gid: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        group = (await c.get(f"/v1/groups/{gid}")).json()
        if all(j["state"] in FINAL for j in group["jobs"]):
            return dict(group)
        assert time.monotonic() < deadline, group
        time.sleep(0.05)


async def test_a_sweep_makes_one_job_per_combination_in_order(settings: Settings) -> None:
    async with _serving(settings) as (c, _):
        r = await c.post(
            "/v1/groups",
            json={
                "spec": {"script": "echo $X$Y", "labels": {"run": "s"}},
                "params": {"X": ["1", "2"], "Y": ["a", "b"]},
            },
        )
        assert r.status_code == 201, r.text
        body = r.json()
        gid = body["group"]
        assert r.headers["location"] == f"/v1/groups/{gid}"
        assert [j["spec"]["environment"] for j in body["jobs"]] == [
            {"X": "1", "Y": "a"},
            {"X": "1", "Y": "b"},
            {"X": "2", "Y": "a"},
            {"X": "2", "Y": "b"},
        ]
        assert all(j["group"] == gid and j["labels"] == {"run": "s"} for j in body["jobs"])
        group = await _all_final(c, gid)
        assert group["states"] == {"completed": 4}
        ids = [j["jobid"] for j in body["jobs"]]
        listed = (await c.get("/v1/jobs", params={"group": gid})).json()["items"]
        assert sorted(j["jobid"] for j in listed) == sorted(ids)
        for jobid, xy in zip(ids, ["1a", "1b", "2a", "2b"], strict=True):
            out = (await c.get(f"/v1/jobs/{jobid}/logs/stdout.1")).text
            assert out == f"{xy}\n"


async def test_one_bad_entry_refuses_the_whole_request(settings: Settings) -> None:
    async with _serving(settings) as (c, _):
        for body, loc in [
            (
                {"jobs": [{"script": "true"}, {"script": "true", "backend": "nope"}]},
                ["body", "jobs", 1, "backend"],
            ),
            ({"jobs": [{"script": "true"}, {"script": "true", "name": "x\ny"}]}, ["body", "jobs", 1, "name"]),
            (
                {"jobs": [{"script": "true", "after": [{"index": 0}]}]},
                ["body", "jobs", 0, "after", 0, "index"],
            ),
            (
                {"jobs": [{"script": "true", "after": [{"index": 5}]}]},
                ["body", "jobs", 0, "after", 0, "index"],
            ),
            (
                {
                    "jobs": [
                        {"script": "true", "after": [{"index": 1}]},
                        {"script": "true", "after": [{"index": 0}]},
                    ]
                },
                ["body", "jobs", 0, "after"],
            ),
            (
                {"spec": {"script": "true", "directory": "rel"}, "params": {"X": ["1"]}},
                ["body", "spec", "directory"],
            ),
            ({"spec": {"script": "true"}, "params": {"1X": ["1"]}}, ["body", "params", "1X", "[key]"]),
            ({"jobs": []}, ["body", "jobs"]),
            # past the 1,000 jobs one request may make: a list, and a sweep's product
            ({"jobs": [{"script": "true"}] * 1001}, ["body", "jobs"]),
            (
                {
                    "spec": {"script": "true"},
                    "params": {"X": [str(i) for i in range(50)], "Y": list("abcdefghijklmnopqrstu")},
                },
                ["body", "params"],
            ),
        ]:
            r = await c.post("/v1/groups", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["errors"][0]["loc"] == loc, r.text
        assert (await c.get("/v1/jobs")).json()["items"] == []  # nothing was made


async def test_an_idempotency_key_replays_the_same_group(settings: Settings) -> None:
    async with _serving(settings) as (c, _):
        body = {"jobs": [{"script": "true"}, {"script": "true"}]}
        first = await c.post("/v1/groups", json=body, headers={"Idempotency-Key": "g1"})
        again = await c.post("/v1/groups", json=body, headers={"Idempotency-Key": "g1"})
        assert first.status_code == again.status_code == 201
        assert again.json()["group"] == first.json()["group"]
        assert [j["jobid"] for j in again.json()["jobs"]] == [j["jobid"] for j in first.json()["jobs"]]
        other = await c.post(
            "/v1/groups", json={"jobs": [{"script": "false"}]}, headers={"Idempotency-Key": "g1"}
        )
        assert other.status_code == 422 and other.json()["code"] == "idempotency_mismatch"
        assert len((await c.get("/v1/jobs")).json()["items"]) == 2


async def test_delete_cancels_every_member_not_ended(settings: Settings) -> None:
    async with _serving(settings) as (c, _):
        r = await c.post("/v1/groups", json={"jobs": [{"script": "true"}, {"script": "sleep 60"}]})
        gid = r.json()["group"]
        fast = r.json()["jobs"][0]["jobid"]
        deadline = time.monotonic() + 20
        while (await c.get(f"/v1/jobs/{fast}")).json()["state"] not in FINAL:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = await c.delete(f"/v1/groups/{gid}")
        assert r.status_code == 200, r.text
        group = await _all_final(c, gid)
        assert group["states"] == {"completed": 1, "canceled": 1}


async def test_a_group_is_the_callers_alone(settings: Settings) -> None:
    async with _serving(settings) as (c, app):
        gid = (await c.post("/v1/groups", json={"jobs": [{"script": "true"}]})).json()["group"]
        groups: GroupService = context(app).groups
        for act in (groups.get, groups.cancel):
            with pytest.raises(Exception, match="no group") as e:
                await act(Principal("bob"), gid)
            assert getattr(e.value, "code", None) == "not_found"
        assert (await c.get(f"/v1/groups/{'0' * 32}")).status_code == 404
        assert (await c.get("/v1/groups/nothex")).status_code == 422


async def test_a_request_that_died_before_its_answer_leaves_nothing_and_a_replay_makes_it_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"jobs": [{"script": "true"}, {"script": "true"}, {"script": "true"}]}
    mark = GroupLog.mark

    def dies_before_settling(self: GroupLog, gid: str, column: str) -> None:
        if column == "settled":
            raise SystemExit("the server was killed here")
        mark(self, gid, column)

    monkeypatch.setattr(GroupLog, "mark", dies_before_settling)
    async with _serving(settings) as (c, _):
        with pytest.raises(SystemExit):
            await c.post("/v1/groups", json=body, headers={"Idempotency-Key": "k"})
        assert len((await c.get("/v1/jobs")).json()["items"]) == 3  # made, never answered
    monkeypatch.setattr(GroupLog, "mark", mark)
    async with _serving(settings) as (c, _):
        assert (await c.get("/v1/jobs")).json()["items"] == []  # start-up removed them
        r = await c.post("/v1/groups", json=body, headers={"Idempotency-Key": "k"})
        assert r.status_code == 201, r.text
        await _all_final(c, r.json()["group"])
        assert len((await c.get("/v1/jobs")).json()["items"]) == 3


async def test_a_request_that_died_while_starting_its_jobs_has_them_started_at_start_up(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"jobs": [{"script": "true"}, {"script": "true"}]}
    start = GroupService._start

    async def dies_before_starting(self: GroupService, principal: Principal, gid: str, jobids: Any) -> None:
        raise SystemExit("the server was killed here")

    monkeypatch.setattr(GroupService, "_start", dies_before_starting)
    async with _serving(settings) as (c, _):
        with pytest.raises(SystemExit):
            await c.post("/v1/groups", json=body, headers={"Idempotency-Key": "k"})
        states = {j["state"] for j in (await c.get("/v1/jobs")).json()["items"]}
        assert states == {"new"}
    monkeypatch.setattr(GroupService, "_start", start)
    async with _serving(settings) as (c, _):
        r = await c.post("/v1/groups", json=body, headers={"Idempotency-Key": "k"})
        assert r.status_code == 201, r.text
        group = await _all_final(c, r.json()["group"])
        assert group["states"] == {"completed": 2}
        assert len((await c.get("/v1/jobs")).json()["items"]) == 2


async def test_a_group_larger_than_the_job_slots_runs_at_most_max_running_at_once(
    settings: Settings, tmp_path: Any
) -> None:
    from psik_api_server.settings import BackendSettings

    settings.backends = {"default": BackendSettings(type="local", max_running=2)}
    log = tmp_path / "ran.log"
    script = f'echo "start $$" >> {log}\nsleep 0.3\necho "end $$" >> {log}\n'
    async with _serving(settings) as (c, _):
        r = await c.post("/v1/groups", json={"jobs": [{"script": script}] * 6})
        assert r.status_code == 201, r.text
        states = [j["state"] for j in r.json()["jobs"]]
        assert states.count("queued") >= 4, states  # waiting for a slot, in order
        waits = [j for j in r.json()["jobs"] if j["native_id"] is None]
        assert all(j["history"][-1]["info"].startswith("waiting for a free job slot") for j in waits)
        group = await _all_final(c, r.json()["group"])
        assert group["states"] == {"completed": 6}
    running = most = 0
    for line in log.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    assert most == 2, log.read_text()


async def test_a_group_filter_that_is_no_group_id_is_refused(settings: Settings) -> None:
    async with _serving(settings) as (c, _):
        r = await c.get("/v1/jobs", params={"group": "zz"})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "group"], r.text
