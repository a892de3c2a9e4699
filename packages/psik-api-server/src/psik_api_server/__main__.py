"""``python -m psik_api_server serve`` works where the console script is not on PATH."""

from .cli import main

raise SystemExit(main())
