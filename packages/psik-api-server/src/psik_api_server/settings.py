"""Server settings and the config file that sets them.

Where the config comes from, first found wins: ``--config FILE``, ``$PSIK_API_CONFIG``,
``$VIRTUAL_ENV/etc/psik_api.json``, else the embedded default (local backend, jobs and
the SQLite index under the user's data directory, ``authz: local``, 127.0.0.1:8000).

Two file formats are accepted:

* the original psik_api's: ``{"backends": {NAME: {"prefix", "backend": {...},
  "psik_path", "rc_path"}}, "authz": ...}``;
* psik 3's flat one: ``{"prefix": DIR, "backends": {NAME: {"type": ...}}}``.

Keys that are unknown or have no effect are reported in one line (see ``notes``);
a broken file stops start-up with its name and the reason (:class:`ConfigError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from psik_api_core import LIMITS

from .backends import driver_class

CONFIG_ENV = "PSIK_API_CONFIG"


class ConfigError(Exception):
    """The config file cannot be used; the message names the file and says why."""


class BackendSettings(BaseModel):
    """One backend, as psik's ``BackendConfig`` plus the prefix its jobs live under."""

    model_config = ConfigDict(extra="forbid")

    type: str = "local"
    queue_name: str | None = None
    project_name: str | None = None
    reservation_id: str | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    #: At most this many of the backend's jobs run at once; the others wait ``queued``
    #: and start in submission order as slots free up. Local default: the CPU count.
    #: Other backends: no cap here (their scheduler has its own).
    max_running: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _attributes_the_backend_may_take(self) -> BackendSettings:
        # Merged into every job's attributes: a backend's must pass the check each job's
        # do (a Slurm backend's: sbatch's allow-list). AttributeRefused is a ValueError:
        # start-up stops naming the attribute.
        driver_class(self.type).check_attributes(self.attributes)
        return self

    def psik_fields(self) -> dict[str, Any]:
        """What psik's ``BackendConfig`` takes (the server's own settings left out)."""
        return self.model_dump(exclude={"max_running"})

    def slot_limit(self) -> int | None:
        """How many of this backend's jobs may run at once; None: no cap."""
        if self.max_running is not None:
            return self.max_running
        return driver_class(self.type).default_slots()


class RateLimits(BaseModel):
    """Per-identity rate limits (serving/rate_limit.py): token buckets, in requests and
    in jobs submitted per second, and a cap on requests in progress. A rate (or
    ``concurrent``) of 0 turns its limit off; all 0 turns them all off."""

    model_config = ConfigDict(extra="forbid")

    #: Requests an identity may make per second, on average (health and docs are free).
    requests_per_second: float = Field(default=50.0, ge=0, le=1_000_000)
    #: Requests an identity may make at once, above the average, before it waits.
    burst: int = Field(default=100, ge=0, le=1_000_000)
    #: Jobs an identity may submit per second (``POST /v1/jobs``, ``.../start``; a group
    #: counts as its number of jobs), on average.
    submits_per_second: float = Field(default=10.0, ge=0, le=1_000_000)
    #: Jobs an identity may submit at once: by default the largest group, so that one
    #: goes through whole and leaves no debt to wait out (a client gives up on long waits).
    submit_burst: int = Field(default=LIMITS.max_group_jobs, ge=1, le=1_000_000)
    #: Requests of one identity in progress at once (0: no cap); those past it wait their
    #: turn, without holding the server, so that a flood queues behind itself.
    concurrent: int = Field(default=4, ge=0, le=100_000)
    #: Requests of one identity that may wait for a turn; past them, 429 ``rate_limited``.
    queued: int = Field(default=100, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _a_burst_to_start_with(self) -> RateLimits:
        if self.requests_per_second > 0 and self.burst < 1:
            raise ValueError("burst must be at least 1 while requests_per_second is not 0")
        return self

    @property
    def enabled(self) -> bool:
        """Whether any limit is on."""
        return self.requests_per_second > 0 or self.submits_per_second > 0 or self.concurrent > 0


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/psik_api`` (``~/.local/share/psik_api`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "psik_api"


def default_state_dir(prefix: Path) -> Path:
    """The state directory of the server of ``prefix``: ``$XDG_STATE_HOME/psik_api/
    <name>-<digest>`` (``~/.local/state/...`` when unset), named after the prefix's real
    path, so that one prefix (however it is spelled) has one, and two have two."""
    base = os.environ.get("XDG_STATE_HOME", "")
    home = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    real = os.path.realpath(prefix.expanduser())
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real))[:40].lstrip(".") or "prefix"
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    return home / "psik_api" / f"{name}-{digest}"


class Settings(BaseModel):
    """Everything the server needs to know; built by :func:`load_settings` or by hand."""

    model_config = ConfigDict(extra="forbid")

    prefix: Path = Field(default_factory=lambda: default_data_dir() / "jobs")
    database: Path | None = Field(
        default=None, description="SQLite index; default: index.sqlite in the state directory"
    )
    backends: dict[str, BackendSettings] = Field(default_factory=lambda: {"default": BackendSettings()})
    #: ``local``: only the server's own user, on this host (auth/local.py).
    #: ``token``: TLS client certificates under ``certified serve`` and biscuit bearer
    #: tokens; without TLS, no job routes at all (auth/token.py). A seed-style
    #: ``"module:Class"`` means ``token`` with that policy.
    authz: Literal["local", "token"] = "local"
    #: Who may act on which job: ``module:Class`` implementing core's ``Policy``
    #: (default: core's ``OwnerPolicy``); imported without the current directory on sys.path.
    policy: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    #: Lifetime of the tokens ``GET /v1/token`` mints (seconds; the caller may ask for less).
    token_lifetime: float = Field(default=86400.0, gt=0, le=366 * 86400)
    #: Token mode: who may read ``GET /metrics``, by the names token mode gives callers
    #: (``uid:alice``, ``cn:agent``); empty: nobody. Local mode: the owner, as every route.
    metrics_readers: list[str] = Field(default_factory=list)
    #: The server's own files: the index (unless ``database``), its lock, the launcher's
    #: log and the token signing key (``token-key.pem``). Never beside the prefix, where
    #: others may write (/tmp): default :func:`default_state_dir`. See statedir.py.
    state_dir: Path | None = None
    #: The certified config directory ``certified serve`` runs with (its
    #: ``known_clients/`` tells which CA may sign for which user: certnames.py); default:
    #: ``certified serve``'s own ``--config``, else certified's defaults.
    certified_config: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: Roots a JobSpec.directory may point into; empty = only the job's own work dir.
    directory_roots: list[Path] = Field(default_factory=list)
    #: How often the watcher looks at non-final jobs' status.csv (seconds).
    watch_interval: float = Field(default=0.05, gt=0, le=60)
    #: How often local jobs' processes are checked for having vanished (seconds).
    liveness_interval: float = Field(default=2.0, gt=0, le=3600)
    #: Open connections at most; at the limit a new connection closes the one that has
    #: waited longest for a request (idle, keep-alive or slow), else the one whose request
    #: body has stalled longest. Fitted under the open-file limit at start. See limits.py.
    max_connections: int = Field(default=1000, ge=1, le=1_000_000)
    #: Event streams (``GET /v1/events`` as SSE) open at most: past it a new one is 503
    #: ``too_many_streams``. Default: 90% of ``max_connections``, so that streams never
    #: take every connection from ordinary requests.
    max_event_streams: int | None = Field(default=None, ge=1, le=1_000_000)
    #: Seconds between the comments that keep an idle event stream open through proxies.
    event_heartbeat: float = Field(default=15.0, gt=0, le=3600)
    #: Events a stream may have waiting to be sent; a reader that falls further behind is
    #: dropped (it resumes with ``Last-Event-ID``, losing nothing).
    event_buffer: int = Field(default=10_000, ge=1, le=1_000_000)
    #: Seconds a connection has to send a complete request head (slowloris); also the
    #: longest a request body may stall, and how long it has before it must average
    #: ``limits.MIN_BODY_RATE`` (1 KiB/s).
    header_timeout: float = Field(default=10.0, gt=0, le=3600)
    #: Seconds an idle keep-alive connection stays open (``serve``; under ``uvicorn``
    #: itself, its ``--timeout-keep-alive``).
    keep_alive_timeout: int = Field(default=5, ge=1, le=3600)
    #: Largest file upload (a raw body, or a whole multipart request), in bytes; past
    #: it the upload is refused (413) and nothing of it is kept.
    max_upload_bytes: int = Field(default=4 << 30, ge=1)
    #: This server's own ``/v1/callback`` URL as the backends' jobs reach it. When set,
    #: every job created reports its state changes there, signed with a secret made for
    #: that job (see callbacks.py); a user's own ``callback`` is relayed from there.
    callback_url: str | None = None
    #: Token mode: the hosts a user's ``JobSpec.callback`` may point at (``name``, or
    #: ``*.domain`` for its subdomains; an IP address only as itself). Empty: none.
    callback_hosts: list[str] = Field(default_factory=list)
    #: Token mode: whether a spec may ask for ``inherit_environment: true`` (the job
    #: would start with the server's environment). Off: refused, and the default is false.
    allow_inherit_environment: bool = False
    #: The server's log lines: ``text`` (human-readable, uvicorn's access line) or
    #: ``json`` (one object per line, and one access line per request; serving.request_log).
    log_format: Literal["text", "json"] = "text"
    #: Per-identity rate limits; null: none. Unset: none in local mode (one user), the
    #: defaults of :class:`RateLimits` in token mode (``_default_rate_limits``).
    rate_limits: RateLimits | None = None
    #: What the loader noticed but did not use, for the start-up log.
    notes: list[str] = Field(default_factory=list, exclude=True)
    #: The file these settings came from (None: the embedded default).
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("prefix", "database", "state_dir", "certified_config")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()

    @model_validator(mode="before")
    @classmethod
    def _seed_authz(cls, data: Any) -> Any:
        """The seed's ``authz: "module:Class"``: token mode with that policy."""
        if isinstance(data, dict) and isinstance(data.get("authz"), str) and ":" in data["authz"]:
            if data.get("policy") not in (None, data["authz"]):
                raise ValueError(f"authz {data['authz']!r} and policy {data['policy']!r} disagree; give one")
            data = {**data, "policy": data["authz"], "authz": "token"}
        return data

    @model_validator(mode="after")
    def _default_rate_limits(self) -> Settings:
        # Token mode serves many users: one must not starve the others unless the site
        # says so (``"rate_limits": null``).
        if "rate_limits" not in self.model_fields_set and self.authz == "token":
            self.rate_limits = RateLimits()
        return self

    @field_validator("callback_url")
    @classmethod
    def _absolute_url(cls, v: str | None) -> str | None:
        if v is not None:
            url = urlsplit(v)
            if url.scheme not in {"http", "https"} or not url.hostname:
                raise ValueError("must be an absolute http(s) URL (this server's /v1/callback)")
        return v

    def notes_line(self) -> str | None:
        """What the config file says that has no effect, in one line (None if nothing)."""
        if not self.notes:
            return None
        return f"config {self.source or '(default)'}: " + "; ".join(self.notes)

    @property
    def state_directory(self) -> Path:
        """The state directory in use: ``state_dir``, else the prefix's own default."""
        return self.state_dir or default_state_dir(self.prefix)

    @property
    def database_path(self) -> Path:
        return self.database or self.state_directory / "index.sqlite"

    @property
    def token_key_path(self) -> Path:
        """The token signing key: ``<state directory>/token-key.pem``."""
        return self.state_directory / "token-key.pem"

    @property
    def launcher_log_path(self) -> Path:
        """The local launcher's log (job names, paths, errors): in the state directory."""
        return self.state_directory / "launcher.log"


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read, or None for the embedded default."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        candidate = Path(venv) / "etc" / "psik_api.json"
        if candidate.is_file():
            return candidate
    return None


def load_settings(explicit: str | os.PathLike[str] | None = None) -> Settings:
    """Settings from the config file found by :func:`find_config`, or the default."""
    path = find_config(explicit)
    if path is None:
        return Settings()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top")
    try:
        settings = parse_config(raw)
    except ValidationError as e:
        reasons = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{path}: {reasons}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    settings.source = path
    return settings


_SERVER_KEYS = {
    "authz",
    "policy",
    "token_lifetime",
    "metrics_readers",
    "state_dir",
    "certified_config",
    "host",
    "port",
    "database",
    "directory_roots",
    "watch_interval",
    "liveness_interval",
    "max_connections",
    "max_event_streams",
    "event_heartbeat",
    "event_buffer",
    "header_timeout",
    "keep_alive_timeout",
    "max_upload_bytes",
    "callback_url",
    "callback_hosts",
    "allow_inherit_environment",
    "log_format",
    "rate_limits",
}
_SEED_BACKEND_IGNORED = {
    "psik_path": "psik 3 runs jobs with the server's own Python; psik_path is not used",
    "rc_path": "psik 3 does not use the rc shell; rc_path is not used",
}


def parse_config(raw: dict[str, Any]) -> Settings:
    """Settings from a parsed config document in either accepted format."""
    notes: list[str] = []
    out: dict[str, Any] = {k: raw[k] for k in _SERVER_KEYS if k in raw}
    backends_raw = raw.get("backends", {"default": {}})
    if not isinstance(backends_raw, dict):
        raise ValueError("'backends' must be an object mapping names to backends")

    seed_style = any(isinstance(v, dict) and "backend" in v for v in backends_raw.values())
    if seed_style:
        prefixes: set[str] = set()
        backends: dict[str, Any] = {}
        for name, entry in backends_raw.items():
            if not isinstance(entry, dict):
                raise ValueError(f"backends.{name} must be an object")
            for key in entry:
                if key in _SEED_BACKEND_IGNORED:
                    notes.append(f"backends.{name}.{key} ignored ({_SEED_BACKEND_IGNORED[key]})")
                elif key not in {"prefix", "backend"}:
                    notes.append(f"backends.{name}.{key} unknown, ignored")
            if "prefix" in entry:
                prefixes.add(str(entry["prefix"]))
            backends[name] = entry.get("backend", {})
        if len(prefixes) > 1:
            raise ValueError(
                "all backends must share one prefix (found "
                + ", ".join(sorted(prefixes))
                + "); run one server per prefix"
            )
        if prefixes and "prefix" not in raw:
            out["prefix"] = prefixes.pop()
        out["backends"] = backends
    else:
        out["backends"] = backends_raw
    if "prefix" in raw:
        out["prefix"] = raw["prefix"]
    for key in raw:
        if key not in _SERVER_KEYS and key not in {"backends", "prefix"}:
            notes.append(f"{key} unknown, ignored")
    settings = Settings.model_validate(out)
    settings.notes = notes
    return settings
