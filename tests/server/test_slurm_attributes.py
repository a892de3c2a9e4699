"""Which backend or job attributes reach sbatch (:mod:`psik_api_server.backends.slurm.options`):
an allow-list of sbatch options, each with the kind of value it takes, passed as one
``--name=value`` argument; psik's own attributes never reach sbatch; anything else is
refused by name, before anything is submitted. Runs without Slurm.

Hostile tests A3 and issue 14: sbatch takes unambiguous prefixes of long options
(``--wra`` is ``--wrap``), clustered short options (``-vo`` is ``-v -o``), and a flag's
value as its next argument (``{"--hold": "x.sh"}`` made ``x.sh`` the script); every one
of these reached sbatch through the old deny-list and ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

from psik_api_server.backends.slurm.options import (
    MAX_VALUE,
    SBATCH_OPTIONS,
    SHORT_OPTIONS,
    AttributeRefused,
    sbatch_options,
)
from psik_api_server.settings import BackendSettings, Settings

pytestmark = pytest.mark.anyio

#: Each reached sbatch (and ran) through the deny-list.
ATTACKS: list[dict[str, str]] = [
    {"--wra": "touch /tmp/pwned"},  # a prefix of --wrap
    {"--outp": "/tmp/anywhere"},  # --output
    {"--chd": "/"},  # --chdir
    {"--arr": "1-100"},  # --array
    {"--export-f": "/etc/shadow"},  # --export-file
    {"--pars": ""},  # --parsable
    {"-vo": "/tmp/anywhere"},  # -v -o: clustered short options
    {"-vD": "/"},
    {"-va": "1-5"},
    {"-Qo": "/tmp/x"},  # --quiet silenced --parsable: a 502 while Slurm ran the job
    {"-Q": ""},
    {"--quiet": ""},
    {"--exclusive": "--wrap=touch /tmp/pwned"},  # a flag's value became the next argument
    {"--hold": "x.sh"},
    {"--contiguous": "evil.sh"},
    {"--": "evil.sh"},  # end of options: evil.sh is the script
    {"-": "x"},
    {"--wrap": "x"},
    {"--output": "/tmp/x"},
    {"-o": "/tmp/x"},
    {"--uid": "0"},
    {"--export": "ALL,LD_PRELOAD=/tmp/x.so"},
    {"--clusters": "other"},
    {"--qos=normal": ""},  # the value belongs in the value
    {"--QOS": "normal"},
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: next(iter(a)))
def test_options_not_on_the_allow_list_are_refused_by_name(attack: dict[str, str]) -> None:
    [name] = attack
    with pytest.raises(AttributeRefused) as info:
        sbatch_options(attack)
    assert info.value.name == name
    assert repr(name) in str(info.value)
    assert info.value.why and info.value.why in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("--qos", "-wrap", "must not start with '-'"),
        ("--comment", "a\nb", "control character"),
        ("--comment", "x" * (MAX_VALUE + 1), f"longer than {MAX_VALUE}"),
        ("--nodes", "two", "a node count"),
        ("--ntasks", "1 --wrap=x", "a whole number"),
        ("--time", "1 hour", "a time limit"),
        ("--mem", "4 GB", "a memory size"),
        ("--partition", "debug;rm", "name"),
        ("--exclusive", "yes", "user"),
        ("--qos", "", "needs a value"),
    ],
)
def test_values_are_checked_against_their_kind(name: str, value: str, why: str) -> None:
    with pytest.raises(AttributeRefused, match=why) as info:
        sbatch_options({name: value})
    assert info.value.name == name


def test_allowed_options_become_single_name_value_arguments() -> None:
    given = {
        "psik_python": "/opt/py",  # psik's own: never sbatch's
        "-q": "normal",  # short forms are their long names
        "--comment": "from psik-api, with spaces",
        "--exclusive": "",  # a flag alone
        "-N": "1-2",
        "--time": "1-12:00:00",
        "--mem": "4G",
        "-C": "[rack1|rack2]&cpu",
        "--dependency": "afterok:12:13,singleton",
        "--begin": "now+1hour",
        "--hold": "",
    }
    assert sbatch_options(given) == [
        "--qos=normal",
        "--comment=from psik-api, with spaces",
        "--exclusive",
        "--nodes=1-2",
        "--time=1-12:00:00",
        "--mem=4G",
        "--constraint=[rack1|rack2]&cpu",
        "--dependency=afterok:12:13,singleton",
        "--begin=now+1hour",
        "--hold",
    ]
    assert sbatch_options({"--exclusive": "user"}) == ["--exclusive=user"]


def test_every_short_form_names_an_allowed_option() -> None:
    assert all(len(s) == 2 and s[0] == "-" and long in SBATCH_OPTIONS for s, long in SHORT_OPTIONS.items())
    refused = {"--wrap", "--output", "--error", "--input", "--chdir", "--array", "--wait", "--parsable",
               "--quiet", "--verbose", "--test-only", "--uid", "--gid", "--export", "--export-file",
               "--open-mode", "--clusters", "--nodefile", "--bbf", "--get-user-env"}  # fmt: skip
    assert not refused & set(SBATCH_OPTIONS)


def test_a_backend_whose_attributes_sbatch_must_not_get_does_not_start() -> None:
    with pytest.raises(pydantic.ValidationError, match="'--wra'"):
        BackendSettings(type="slurm", attributes={"--wra": "touch /tmp/x"})
    # A local backend's attributes are psik's business, not sbatch's.
    BackendSettings(type="local", attributes={"--wra": "x"})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A Slurm backend (no cluster needed: the request is refused before sbatch)."""
    return Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        backends={"default": BackendSettings(type="local"), "slurm": BackendSettings(type="slurm")},
        watch_interval=0.02,
    )


@pytest.mark.parametrize("attack", ATTACKS[:14], ids=lambda a: next(iter(a)))
async def test_a_refused_attribute_is_422_naming_it_and_nothing_is_made(
    http: httpx.AsyncClient, tmp_path: Path, attack: dict[str, Any]
) -> None:
    [name] = attack
    for route in ("/v1/jobs", "/v1/jobs/new"):
        r = await http.post(route, json={"backend": "slurm", "script": "true", "attributes": attack})
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "validation_error"
        assert [e["loc"] for e in problem["errors"]] == [["body", "attributes", name]]
        assert repr(name) in problem["detail"]
    assert (await http.get("/v1/jobs")).json()["items"] == []
    assert [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()] == []  # no job directory either


async def test_a_local_job_s_attributes_are_not_sbatch_s(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/jobs/new", json={"script": "true", "attributes": {"--wra": "x"}})
    assert r.status_code == 201, r.text
