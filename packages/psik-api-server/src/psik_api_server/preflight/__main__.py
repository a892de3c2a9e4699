"""``python -m psik_api_server.preflight``: the ``check`` command on its own."""

from __future__ import annotations

import argparse

from . import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="psik-api-server check", description="Whether `psik-api-server serve` would start and work."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
