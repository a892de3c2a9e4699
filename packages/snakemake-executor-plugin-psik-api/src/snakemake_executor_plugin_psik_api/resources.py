"""A Snakemake job's resources as a psik JobSpec asks for them.

What every backend reads is the JobSpec's ``resources`` (psik's ResourceSpec):
``threads`` -> ``cpu_cores_per_process``, ``runtime`` (minutes) -> ``duration``,
``gpu`` -> ``gpu_cores_per_process``, ``nodes`` -> ``node_count``, ``tasks`` ->
``process_count``. What only a scheduler knows (memory, partition, account) goes into the
job's backend ``attributes``, named as that backend type takes them: one table per type
(:data:`ATTRIBUTES`), so teaching the plugin a scheduler is one entry. What a backend
type has no place for is reported once per run (:class:`ResourceMapper.unmapped`), as
are attributes given for a backend type that reads none (:data:`NO_ATTRIBUTES`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from psik_api_client import ResourceSpec

#: Snakemake's resources that ResourceSpec has a field for: name -> field.
SPEC_FIELDS: dict[str, str] = {
    "runtime": "duration",
    "gpu": "gpu_cores_per_process",
    "nodes": "node_count",
    "tasks": "process_count",
}

#: Snakemake's own bookkeeping, and twins of a resource mapped under its other name
#: (mem_mib of mem_mb, disk_mib of disk_mb): never worth a word.
IGNORED = frozenset(
    {"_cores", "_nodes", "_job_count", "tmpdir", "threads", "mem", "mem_mib", "disk", "disk_mib"}
)


def _megabytes(value: int | str) -> str:
    return f"{value}M"


def _text(value: int | str) -> str:
    return str(value)


#: Per backend type: Snakemake resource -> (attribute name, how its value is written).
#: The Slurm backend passes these as sbatch options (its allow-list has each).
ATTRIBUTES: dict[str, dict[str, tuple[str, Callable[[int | str], str]]]] = {
    "slurm": {
        "mem_mb": ("--mem", _megabytes),
        "mem_mb_per_cpu": ("--mem-per-cpu", _megabytes),
        "slurm_partition": ("--partition", _text),
        "slurm_account": ("--account", _text),
        "qos": ("--qos", _text),
        "constraint": ("--constraint", _text),
    },
}

#: Backend types that read no attributes at all (psik's local backend runs the script
#: as it is): attributes given for every job are not passed on to one, and said so.
NO_ATTRIBUTES = frozenset({"local"})


@dataclass
class MappedResources:
    """One job's resources: the ResourceSpec, the backend attributes, and the names of
    those resources given that this backend type cannot take."""

    resources: ResourceSpec
    attributes: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


class ResourceMapper:
    """Maps a job's resources for one backend type (``local``, ``slurm``, ...)."""

    def __init__(self, backend_type: str) -> None:
        self.backend_type = backend_type
        self.attributes = ATTRIBUTES.get(backend_type, {})

    @property
    def takes_attributes(self) -> bool:
        """Whether this backend type reads a job's ``attributes``."""
        return self.backend_type not in NO_ATTRIBUTES

    def mapped_names(self) -> list[str]:
        """The resource names this backend type takes (besides ``threads``)."""
        return sorted([*SPEC_FIELDS, *self.attributes])

    def unmapped(self, names: Iterable[str]) -> list[str]:
        """Of ``names`` (resources some job gives), those this backend type cannot take."""
        return sorted(
            {n for n in names if n not in IGNORED and n not in SPEC_FIELDS and n not in self.attributes}
        )

    def map(self, threads: int, resources: Mapping[str, int | str | None]) -> MappedResources:
        """The JobSpec's share of a job with ``threads`` and ``resources``. A job never
        takes a node for itself (``exclusive_node_use`` off: a workflow's jobs are many
        and small); a resource whose value is not a positive whole number where the
        spec needs one is left to the backend's default, and listed as unmapped."""
        spec: dict[str, int | bool] = {
            "cpu_cores_per_process": max(1, int(threads)),
            "exclusive_node_use": False,
        }
        attributes: dict[str, str] = {}
        unmapped: list[str] = []
        for name, value in resources.items():
            if value is None or name in IGNORED:
                continue
            if name in SPEC_FIELDS:
                number = _whole(value)
                if number is None:
                    unmapped.append(name)
                elif number > 0:
                    spec[SPEC_FIELDS[name]] = number
            elif name in self.attributes:
                attribute, write = self.attributes[name]
                attributes[attribute] = write(value)
            else:
                unmapped.append(name)
        return MappedResources(ResourceSpec.model_validate(spec), attributes, sorted(unmapped))


def _whole(value: int | str) -> int | None:
    """``value`` as a whole number (Snakemake may hand "60" as text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return None
