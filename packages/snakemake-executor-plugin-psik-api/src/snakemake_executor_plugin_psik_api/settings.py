"""What a user sets: the server, how to reach it, and which of its backends runs the jobs
(``--psik-api-*`` on the command line, or a profile's ``psik-api-*`` keys), and what the
plugin tells Snakemake about itself (:data:`common_settings`)."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from snakemake_interface_common.exceptions import WorkflowError

# The executor interface ships no py.typed: its names are Any to mypy.
from snakemake_interface_executor_plugins.settings import (  # type: ignore[import-untyped]
    CommonSettings,
    ExecutorSettingsBase,
)


def parse_attributes(text: str) -> dict[str, str]:
    """``--psik-api-attributes '{"--qos": "debug"}'``: a JSON object of strings (an
    attribute's name is often an option, ``--qos``, which argparse would take for one
    of its own if given bare)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"--psik-api-attributes: not a JSON object ({e}): {text!r}") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise WorkflowError(
            f'--psik-api-attributes: give a JSON object of strings, e.g. {{"--qos": "debug"}}, not {text!r}'
        )
    return value


def unparse_attributes(value: dict[str, str]) -> str:
    """The text :func:`parse_attributes` reads back."""
    return json.dumps(value)


# typing.Optional, not "X | None": Snakemake's argparse bridge (snakemake-interface-
# common's dataclass_field_to_argument_args) recognises only typing.Union.
@dataclass
class ExecutorSettings(ExecutorSettingsBase):  # type: ignore[misc]
    """The ``--psik-api-*`` settings. Left out, the server is the client's default:
    ``$PSIK_API_UDS``, else ``$PSIK_API_URL``, else ``http://127.0.0.1:8000``."""

    url: Optional[str] = field(  # noqa: UP045
        default=None,
        metadata={
            "help": "The psik-api server's URL (default: $PSIK_API_URL, else http://127.0.0.1:8000).",
            "env_var": False,
            "required": False,
        },
    )
    uds: Optional[Path] = field(  # noqa: UP045
        default=None,
        metadata={
            "help": "Reach the server through this UNIX socket instead of TCP (default: $PSIK_API_UDS).",
            "env_var": False,
            "required": False,
        },
    )
    cert_dir: Optional[Path] = field(  # noqa: UP045
        default=None,
        metadata={
            "help": "A certified identity directory (id.crt, id.key, known_servers/) for an "
            "https server run under `certified serve` (default: $PSIK_API_CERTIFIED).",
            "env_var": False,
            "required": False,
        },
    )
    token_env: str = field(
        default="PSIK_API_TOKEN",
        metadata={
            "help": "The environment variable holding a bearer token for the server "
            "(never given on the command line, where other users could read it).",
            "env_var": False,
            "required": False,
        },
    )
    backend: str = field(
        default="default",
        metadata={
            "help": "The server's backend that runs the jobs (GET /v1/backends lists them).",
            "env_var": False,
            "required": False,
        },
    )
    attributes: Optional[dict[str, str]] = field(  # noqa: UP045
        default=None,
        metadata={
            "help": 'Backend attributes every job gets, as a JSON object, e.g. \'{"--qos": "debug"}\' '
            "for a Slurm backend (a rule's own resources take precedence).",
            "env_var": False,
            "required": False,
            "parse_func": parse_attributes,
            "unparse_func": unparse_attributes,
        },
    )


common_settings = CommonSettings(
    # The jobs run where the server runs them, not in this process.
    non_local_exec=True,
    # The plugin needs the server to share the workflow's filesystem (same host, or a
    # cluster's shared filesystem): each job runs in the workflow's own directory.
    implies_no_shared_fs=False,
    # ... so the sources are already there.
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    # --envvars go into the JobSpec's environment, not the script (which the server
    # keeps in the job's spec.json and shows to whoever may read the job).
    pass_envvar_declarations_to_cmd=False,
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=0,
)
