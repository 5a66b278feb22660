"""pfbuild's client side: the contract models, errors, profile validation and settings.

Imports no docker SDK, so agents can install it thin.
"""

from pfbuild.client.errors import (
    BadRequest,
    BuildFailed,
    EngineUnavailable,
    JobCancelled,
    JobTimeout,
    PfbuildError,
    ProfileRefused,
    QueueUnavailable,
)
from pfbuild.client.models import BuildAnswer, BuildRequest, ErrorInfo, FailureInfo, Manifest
from pfbuild.client.profile import Profile, parse_profile
from pfbuild.client.settings import Settings

__all__ = [
    "BadRequest",
    "BuildAnswer",
    "BuildFailed",
    "BuildRequest",
    "EngineUnavailable",
    "ErrorInfo",
    "FailureInfo",
    "JobCancelled",
    "JobTimeout",
    "Manifest",
    "PfbuildError",
    "Profile",
    "ProfileRefused",
    "QueueUnavailable",
    "Settings",
    "parse_profile",
]
