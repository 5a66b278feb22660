"""pfbuild's client side: the contract models, errors, profile validation and settings.

Imports no docker SDK, so agents can install it thin.
"""

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
from pfbuild.client.models import BuildAnswer, BuildRequest, ErrorInfo, FailureInfo, Manifest
from pfbuild.client.profile import Profile, parse_profile
from pfbuild.client.queue import JobState
from pfbuild.client.settings import Settings

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
