"""Which backend or job attributes reach sbatch (slurm.sbatch_attributes): psik's own
never do; options that would take the job away from psik are refused by name (hostile
test A3: ``--wrap`` replaced psik's script, ``-o`` wrote the console anywhere the
server's user can). Runs without Slurm."""

from __future__ import annotations

import pytest

from psik_api_server.slurm import MAX_ATTRIBUTE_VALUE, sbatch_attributes


def test_sbatch_options_pass_and_psiks_own_do_not() -> None:
    given = {"--qos": "normal", "-C": "cpu", "psik_python": "/opt/py", "--comment": "--wrap=x"}
    assert sbatch_attributes(given) == {"--qos": "normal", "-C": "cpu", "--comment": "--wrap=x"}


@pytest.mark.parametrize(
    "key",
    ["--wrap", "--wrap=touch X", "--output", "-o", "-o/tmp/x", "--error", "-e", "--input", "--chdir", "-D",
     "--array", "-a", "--wait", "-W", "--test-only", "--parsable", "--uid", "--gid", "--export-file"],
)  # fmt: skip
def test_options_that_take_the_job_away_from_psik_are_refused_by_name(key: str) -> None:
    with pytest.raises(ValueError, match="take the job away from psik") as info:
        sbatch_attributes({key: "x"})
    assert repr(key) in str(info.value)


def test_a_key_that_is_no_option_and_a_huge_value_are_refused() -> None:
    with pytest.raises(ValueError, match="not an sbatch option"):
        sbatch_attributes({"qos": "low"})
    with pytest.raises(ValueError, match="over"):
        sbatch_attributes({"--comment": "x" * (MAX_ATTRIBUTE_VALUE + 1)})
