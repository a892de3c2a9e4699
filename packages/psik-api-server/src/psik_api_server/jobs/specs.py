"""What a submitted spec must be before anything is made: :class:`SpecCheck`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from psik_api_core import JobSpec, ProblemCode, field_error, http_url_problem

from ..backends import AttributeRefused
from ..backends.psik_backend import PsikBackend
from ..errors import ApiError
from . import directory as jobdir
from .callbacks import CallbackRecord, split_spec
from .speclimits import SpecLimits


class SpecCheck:
    """Checks a spec against this server (its backends, directory roots and limits) and
    makes it what psik gets (blocking: resolving ``directory`` touches the filesystem).

    ``callback_url``: every job reports to it (see :mod:`.callbacks`); ``spec_limits``:
    what a spec may ask for (token mode, :mod:`.speclimits`)."""

    def __init__(
        self,
        backend: PsikBackend,
        index_path: Path | str,
        *,
        directory_roots: Iterable[Path] = (),
        callback_url: str | None = None,
        spec_limits: SpecLimits | None = None,
    ) -> None:
        self.backend = backend
        self.index_path = index_path
        self.callback_url = callback_url
        self.spec_limits = spec_limits or SpecLimits()
        self._roots = list(directory_roots)
        #: The roots, resolved at start-up (:meth:`resolve_roots`).
        self.directory_roots: list[Path] = []

    def resolve_roots(self) -> None:
        self.directory_roots = [Path(p).expanduser().resolve() for p in self._roots]

    def split(self, spec: JobSpec) -> tuple[JobSpec, CallbackRecord | None]:
        """The (checked) spec as psik gets it, and its callback record."""
        return split_spec(spec, self.callback_url)

    def fingerprint(self, spec: JobSpec) -> str:
        """``jobdir.fingerprint`` of the spec.json psik will write for ``spec``."""
        attributes = {**self.backend.settings[spec.backend].attributes, **spec.attributes}
        return jobdir.fingerprint(spec.model_copy(update={"attributes": attributes}))

    def check(self, spec: JobSpec) -> JobSpec:
        """``spec`` if this server can run it (with ``directory`` resolved), else a 4xx."""
        if spec.backend not in self.backend.settings:
            raise ApiError(
                ProblemCode.unknown_backend,
                f"no backend {spec.backend!r}; configured: " + ", ".join(sorted(self.backend.settings)),
                errors=[field_error(["body", "backend"], "not a configured backend")],
            )
        try:
            # Refused before anything is made or submitted (a Slurm backend: sbatch's allow-list).
            self.backend.check_attributes(spec.backend, spec.attributes)
        except AttributeRefused as e:
            raise ApiError(
                ProblemCode.validation_error,
                str(e),
                errors=[field_error(["body", "attributes", e.name], e.why)],
            ) from None
        if not self.backend.usable(spec.backend):
            raise ApiError(
                ProblemCode.backend_unavailable,
                f"backend {spec.backend!r} is unavailable: {self.backend.health.get(spec.backend)}",
            )
        if spec.callback is not None and (why := http_url_problem(spec.callback)) is not None:
            raise ApiError(
                ProblemCode.validation_error,
                f"callback {spec.callback[:100]!r} {why}",
                errors=[field_error(["body", "callback"], why)],
            )
        spec = self.spec_limits.check(spec)
        if spec.directory is not None:
            # The resolved path is what psik gets: a symlink swapped after this check
            # cannot point the job elsewhere.
            spec = spec.model_copy(update={"directory": str(self.check_directory(spec.directory))})
        return spec

    def check_directory(self, directory: str) -> Path:
        def refuse(why: str) -> ApiError:
            return ApiError(
                ProblemCode.validation_error,
                f"directory {directory!r} {why}",
                errors=[field_error(["body", "directory"], why)],
            )

        if not os.path.isabs(directory):
            raise refuse("must be an absolute path")
        try:
            real = Path(directory).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop; NUL (the input check's)
            raise refuse("cannot be resolved (a symlink loop, or NUL)") from None
        if not any(real == root or real.is_relative_to(root) for root in self.directory_roots):
            roots = ", ".join(str(r) for r in self.directory_roots) or "none configured"
            raise refuse(f"is outside the allowed directory roots ({roots})")
        # The server's own directories, even where the roots reach them: the files
        # routes would serve (and write) other jobs' files, or the index and its journal.
        # A directory beside the index (inside its directory) holds none of its files.
        index_dir = Path(self.index_path).expanduser().resolve().parent
        if index_dir.is_relative_to(real):
            raise refuse(f"is or holds the directory of the server's job index ({index_dir})")
        prefix = Path(self.backend.prefix).resolve()
        if real.is_relative_to(prefix) or prefix.is_relative_to(real):
            raise refuse(f"is, holds or lies inside the server's job directories ({prefix})")
        if not real.is_dir():
            raise refuse("does not exist or is not a directory")
        return real
