"""pfbuild's client side: the contract models, errors, profile validation and settings.

Imports no docker SDK, so agents can install it thin. The names below are loaded on first
use (PEP 562), so a command that needs only some of them pays only for those: ``pfbuild
build`` never loads Celery, and ``import pfbuild.client.settings`` loads no queue.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pfbuild.client.errors import (
        BadRequest,
        BuildFailed,
        BuildTimeout,
        EngineUnavailable,
        JobCancelled,
        JobLost,
        JobTimeout,
        LockLost,
        PfbuildError,
        ProfileRefused,
        QueueUnavailable,
    )
    from pfbuild.client.jobs import BuildClient, BuildJob, JobStatus
    from pfbuild.client.models import (
        BuildAnswer,
        BuildRequest,
        ErrorInfo,
        FailureInfo,
        JobState,
        Manifest,
    )
    from pfbuild.client.profile import Profile, parse_profile
    from pfbuild.client.settings import Settings

# each public name, and the module that defines it
_HOME = {
    **dict.fromkeys(
        ["BadRequest", "BuildFailed", "BuildTimeout", "EngineUnavailable", "JobCancelled",
         "JobLost", "JobTimeout", "LockLost", "PfbuildError", "ProfileRefused",
         "QueueUnavailable"],
        "errors",
    ),
    **dict.fromkeys(["BuildClient", "BuildJob", "JobStatus"], "jobs"),
    **dict.fromkeys(
        ["BuildAnswer", "BuildRequest", "ErrorInfo", "FailureInfo", "JobState", "Manifest"],
        "models",
    ),
    **dict.fromkeys(["Profile", "parse_profile"], "profile"),
    "Settings": "settings",
}

__all__ = [
    "BadRequest",
    "BuildAnswer",
    "BuildClient",
    "BuildFailed",
    "BuildJob",
    "BuildRequest",
    "BuildTimeout",
    "EngineUnavailable",
    "ErrorInfo",
    "FailureInfo",
    "JobCancelled",
    "JobLost",
    "JobState",
    "JobStatus",
    "JobTimeout",
    "LockLost",
    "Manifest",
    "PfbuildError",
    "Profile",
    "ProfileRefused",
    "QueueUnavailable",
    "Settings",
    "parse_profile",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
