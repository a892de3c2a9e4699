"""How a notebook shows jobs: a small HTML table, one row per job, escaped."""

from __future__ import annotations

from html.parser import HTMLParser

import psik_api_client as pac
from client.fakes import job_json, summary_json


class Cells(HTMLParser):
    """The text of each table cell, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.styles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
        elif tag == "span":
            self.styles.append(dict(attrs).get("style") or "")

    def handle_data(self, data: str) -> None:
        if self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def cells(html: str) -> list[list[str]]:
    parser = Cells()
    parser.feed(html)
    return parser.rows


def test_a_job_is_a_one_row_table_with_its_last_history_row() -> None:
    job = pac.Job.model_validate(
        job_json(
            "1.5",
            "failed",
            name="<b>bold</b>",
            exit_code=3,
            jobndx=2,
            history=[
                {"time": "2024-01-01T00:00:00Z", "jobndx": 0, "state": "new", "info": ""},
                {"time": "2024-01-01T00:01:02Z", "jobndx": 2, "state": "failed", "info": "3"},
            ],
        )
    )
    html = job._repr_html_()
    assert "<b>bold</b>" not in html  # names are escaped
    header, row = cells(html)
    assert header == ["jobid", "name", "state", "exit", "created", "updated", "last history row"]
    assert row == [
        "1.5",
        "<b>bold</b>",
        "failed (run 2)",
        "3",
        "2024-01-01 00:00:00+00:00",
        "2024-01-01 00:00:00+00:00",
        "2024-01-01 00:01:02+00:00 run 2 failed: 3",
    ]
    parser = Cells()
    parser.feed(html)
    assert parser.styles == ["color:#dc2626;font-weight:bold"]  # failed is red


def test_a_list_of_jobs_is_one_table() -> None:
    jobs = [
        pac.JobSummary.model_validate(summary_json("1.0", "completed", exit_code=0)),
        pac.JobSummary.model_validate(summary_json("2.0", "active", name=None)),
    ]
    table = pac.jobs_table(jobs)
    assert table == jobs and isinstance(table, list)
    header, *rows = cells(table._repr_html_())
    assert [r[:4] for r in rows] == [["1.0", "hello", "completed", "0"], ["2.0", "", "active", ""]]
    assert [r[-1] for r in rows] == ["", ""]  # a summary has no history
    assert cells(pac.jobs_table([])._repr_html_()) == [header]


def test_the_readable_repr_stays() -> None:
    job = pac.Job.model_validate(job_json("1.0", "completed", exit_code=0))
    expected = "Job(jobid='1.0', name='hello', state=completed, jobndx=1, exit_code=0, backend='default')"
    assert repr(job) == expected
