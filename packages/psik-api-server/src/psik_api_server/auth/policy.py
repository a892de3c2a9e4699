"""A site's own policy (config ``policy: "module:Class"``, or the seed's
``authz: "module:Class"``): imported by name, with the current directory off
``sys.path`` so that a file in whatever directory the server was started from cannot
stand in for the site's module."""

from __future__ import annotations

import importlib
import os
import sys

from psik_api_core import Policy

from ..errors import StartupError


def load_policy(spec: str) -> Policy:
    """An instance of the ``module:Class`` named (made with no arguments)."""
    module_name, _, class_name = spec.partition(":")
    cwd = os.getcwd()
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if p not in ("", ".") and os.path.abspath(p) != cwd]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise StartupError(f"policy {spec}: cannot import {module_name}: {e}") from None
    except Exception as e:  # a syntax error, or one raised while it is imported
        raise StartupError(
            f"policy {spec}: importing {module_name} failed: {type(e).__name__}: {e}"
        ) from None
    finally:
        sys.path[:] = saved
    cls = getattr(module, class_name, None)
    if cls is None:
        raise StartupError(f"policy {spec}: {module_name} has no {class_name}")
    try:
        policy = cls()
    except Exception as e:
        raise StartupError(f"policy {spec}: {class_name}() failed: {e}") from None
    if not callable(getattr(policy, "allows", None)):
        raise StartupError(f"policy {spec}: {class_name} has no allows(principal, action, owner, jobid)")
    return policy  # type: ignore[no-any-return]
