"""The workflow tools' sessions end what they start, as every test does (tests/leaks.py),
and share tests/slurm's real single-node Slurm cluster (its lock lets two sessions use one)."""

from leaks import _ends_what_it_starts, pytest_sessionfinish  # noqa: F401
from slurm.conftest import slurm_cluster  # noqa: F401
