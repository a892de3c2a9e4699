"""Snakemake executor plugin for psik-api: ``snakemake --executor psik-api`` runs each
job of a workflow as a psik-api job (locally, through Slurm, ...), in the workflow's own
directory on a filesystem the server shares.

Snakemake finds the plugin by its module name and reads the three names below.
"""

from ._version import __version__
from .executor import Executor
from .settings import ExecutorSettings, common_settings

__all__ = ["Executor", "ExecutorSettings", "__version__", "common_settings"]
