"""The workflow tools' sessions end what they start, as every test does (tests/leaks.py)."""

from leaks import _ends_what_it_starts, pytest_sessionfinish  # noqa: F401
