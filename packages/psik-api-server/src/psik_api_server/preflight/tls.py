"""Token mode: the certified directory ``certified serve`` runs with, its certificates'
dates, the CAs of ``known_clients/``, and the token signing key."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report import Report

if TYPE_CHECKING:
    from ..settings import Settings

#: A certificate that ends sooner than this is a warning.
EXPIRY_WARNING = dt.timedelta(days=30)


def check_token_mode(report: Report, settings: Settings) -> None:
    """The certified directory ``certified serve`` runs with, its certificates, the CAs
    of ``known_clients/``, and the token signing key."""
    from ..auth.certnames import find_config
    from ..auth.tokens import TokenAuthority
    from ..backends import driver_class
    from ..errors import StartupError

    what = "certified"
    config = find_config(settings.certified_config, argv=(), environ=os.environ)
    if config is None:
        report.fail(
            what,
            "no certified config directory with known_clients/ was found (certified_config, "
            "$CERTIFIED_CONFIG, $VIRTUAL_ENV/etc/certified, /etc/certified): every client would be "
            "refused; set certified_config to the directory `certified init --config DIR` made",
        )
    else:
        _check_certified(report, config)
    key = settings.token_key_path
    if key.exists():
        try:
            TokenAuthority(key, settings.token_lifetime, time.time).load()
        except (StartupError, ImportError, OSError) as e:
            report.fail("token key", str(e))
        else:
            report.ok("token key", f"{key} loads")
    else:
        report.ok("token key", f"{key} does not exist yet; serve makes it (mode 0600)")
    if any(driver_class(b.type).runs_here for b in settings.backends.values()):
        report.warn(
            "token mode",
            "a local backend runs every user's jobs as this server's Unix user, who can read the "
            "token key: serve only users who may act as each other",
        )
    report.warn(
        "token mode",
        "TLS comes from certified: run `certified serve --config DIR psik_api_server.main:app "
        "https://HOST:PORT`; plain `psik-api-server serve` answers no job route",
    )


def _check_certified(report: Report, config: Path) -> None:
    from certified.cert import Certified
    from certified.layout import check_config
    from cryptography import x509

    what = "certified"
    warnings, errors = check_config(config)
    for text in warnings:
        report.warn(what, f"{text} (certified's own check of {config})")
    if errors:
        report.fail(
            what,
            f"{config}: " + "; ".join(dict.fromkeys(errors)) + "; make it with `certified init --config DIR`",
        )
        return
    try:
        Certified(config).ssl_context(False)
    except Exception as e:  # whatever certified raises: it could not serve with it either
        report.fail(what, f"{config}: certified serve cannot load its identity: {type(e).__name__}: {e}")
        return
    report.ok(what, f"{config}: id.crt and id.key load into the TLS context certified serve uses")
    now = dt.datetime.now(dt.UTC)
    for name in ("id.crt", "CA.crt"):
        try:
            cert = x509.load_pem_x509_certificate((config / name).read_bytes())
        except (OSError, ValueError) as e:
            report.fail(what, f"{config / name} cannot be read: {e}")
            continue
        _check_dates(report, f"certificate {name}", config / name, cert, now, fatal=True)
    clients = 0
    for path in sorted((config / "known_clients").glob("*.crt")):
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as e:
            report.warn("known_clients", f"{path} cannot be read ({e}): certified serve skips it too")
            continue
        for cert in certs:
            if _check_dates(report, "known_clients", path, cert, now, fatal=False):
                clients += 1
    if clients == 0:
        report.fail(
            "known_clients",
            f"{config / 'known_clients'} has no CA in date: every client would be refused; "
            "add them with `certified add-client NAME CA.crt --config DIR`",
        )
    else:
        report.ok("known_clients", f"{clients} CA certificate(s) in date in {config / 'known_clients'}")


def _check_dates(report: Report, what: str, path: Path, cert: Any, now: dt.datetime, *, fatal: bool) -> bool:
    """Say a certificate not yet or no longer valid (FAIL if ``fatal``, else warn), or
    ending soon (warn); True if it is valid now."""
    say = report.fail if fatal else report.warn
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        say(what, f"{path} is valid only from {start:%Y-%m-%d %H:%M} UTC; check this machine's clock")
        return False
    if now >= end:
        say(what, f"{path} expired on {end:%Y-%m-%d}; renew it (certified init makes a new identity)")
        return False
    if fatal:
        if end - now < EXPIRY_WARNING:
            report.warn(what, f"{path} expires on {end:%Y-%m-%d}; renew it before then")
        else:
            report.ok(what, f"{path} valid until {end:%Y-%m-%d}")
    return True
