"""Every error pfbuild lets a user see, under one root.

    PfbuildError                    root, never raised itself: a stable ``type``, an exit code
    ├── BadRequest                  the request or profile is refused; nothing was built
    │   ├── ProfileRefused          the profile asks for something pfbuild will not build
    │   ├── InvalidJson             not strict JSON: bad UTF-8, NaN, duplicate keys, too deep
    │   ├── LimitExceeded           a size, length or count over one of Settings' limits
    │   └── UnsafePath              a path with NUL or a loop, or not a regular file / folder
    ├── EngineError                 the Docker engine failed outside a build step
    │   ├── EngineUnavailable       no Docker engine answers
    │   ├── ImageLoadFailed         the engine refused an image tarball
    │   └── BaseImageFailed         the offline base image could not be made
    ├── TarballRejected             a cached tarball failed its checks and was quarantined
    ├── RegistryFailed              the shared registry refused or failed a push, pull or delete
    ├── StorageError                the worker cannot read or write a build's files
    ├── BuildFailed                 the image build failed; carries a failure class and log
    │   └── BuildTimeout            the build ran past the worker's time limit and was stopped
    │       └── BuildIdleTimeout    the build printed nothing for PFBUILD_IDLE_TIMEOUT seconds
    ├── LockLost                    a worker lost its profile lock mid-build and stopped
    ├── LockWaitExceeded            the profile stayed locked by another job for too long
    ├── DeliveriesExhausted         the job's worker died on every delivery; given up
    ├── InternalError               a bug in pfbuild; the message names the exception
    ├── QueueUnavailable            the broker / result backend cannot be reached
    │   └── NoWorkers               a job sits queued on a Redis no worker consumes
    ├── JobTimeout                  waiting for a job took longer than asked
    ├── JobLost                     the job no longer exists: never sent, or wiped with Redis
    └── JobCancelled                the job was revoked before it finished

Each error turns into an :class:`~pfbuild.client.models.ErrorInfo` (``to_info``) to cross a
process boundary as JSON, and back (``from_info``), so a client re-raises the worker's
error with its type, message and failure class intact: never a traceback string.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pfbuild.client.models import ErrorInfo, FailureInfo

__all__ = [
    "BadRequest",
    "BaseImageFailed",
    "BuildFailed",
    "BuildIdleTimeout",
    "BuildTimeout",
    "DeliveriesExhausted",
    "EngineError",
    "EngineUnavailable",
    "ExitCode",
    "ImageLoadFailed",
    "InternalError",
    "InvalidJson",
    "JobCancelled",
    "JobLost",
    "JobTimeout",
    "LimitExceeded",
    "LockLost",
    "LockWaitExceeded",
    "NoWorkers",
    "PfbuildError",
    "ProfileRefused",
    "QueueUnavailable",
    "RegistryFailed",
    "StorageError",
    "TarballRejected",
    "UnsafePath",
]


class ExitCode:
    """Named exit codes of the ``pfbuild`` command line."""

    OK = 0
    INTERNAL = 1
    BAD_REQUEST = 2
    BUILD_FAILED = 3
    ENGINE_UNAVAILABLE = 4
    QUEUE_UNAVAILABLE = 5
    TIMEOUT = 6
    CANCELLED = 7
    LOST = 8


class PfbuildError(Exception):
    """Root of every error pfbuild raises on purpose."""

    type: ClassVar[str] = "pfbuild_error"
    exit_code: ClassVar[int] = ExitCode.INTERNAL

    def __init__(
        self,
        message: str,
        extra: dict[str, Any] | None = None,
        *,
        failure: FailureInfo | None = None,
        build_log_path: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if extra:  # rebuilt from ``args`` by Celery's JSON exception round trip
            failure = failure or (
                FailureInfo.model_validate(extra["failure"]) if extra.get("failure") else None
            )
            build_log_path = build_log_path or extra.get("build_log_path")
            details = details or extra.get("details")
        self.message = message
        self.failure = failure
        self.build_log_path = build_log_path
        self.details = details or {}
        # args are what Celery serialises (as JSON) for a failed task: keeping the
        # structured fields in them lets the client rebuild this very error.
        super().__init__(
            message,
            {
                "failure": failure.model_dump(mode="json") if failure else None,
                "build_log_path": build_log_path,
                "details": self.details,
            },
        )

    def __str__(self) -> str:
        return self.message

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(
            type=self.type,
            message=self.message,
            failure=self.failure,
            build_log_path=self.build_log_path,
            details=self.details,
        )

    @staticmethod
    def from_info(info: ErrorInfo) -> PfbuildError:
        cls = _BY_TYPE.get(info.type, PfbuildError)
        return cls(
            info.message,
            failure=info.failure,
            build_log_path=info.build_log_path,
            details=info.details,
        )


class BadRequest(PfbuildError):
    """The request or its profile is invalid; nothing was built or written."""

    type = "bad_request"
    exit_code = ExitCode.BAD_REQUEST


class ProfileRefused(BadRequest):
    """The profile is valid JSON but asks for something pfbuild refuses to build."""

    type = "profile_refused"


class InvalidJson(BadRequest):
    """Not strict JSON: bad UTF-8, a lone surrogate, NaN, a duplicate key, too deep."""

    type = "invalid_json"


class LimitExceeded(BadRequest):
    """A size, length or count is over a limit in ``Settings``; ``details`` names the setting."""

    type = "limit_exceeded"


class UnsafePath(BadRequest):
    """A path holds NUL or loops, or names something other than a regular file or folder."""

    type = "unsafe_path"


class EngineError(PfbuildError):
    """The Docker engine failed outside of a build step (save, load, inspect)."""

    type = "engine_error"
    exit_code = ExitCode.ENGINE_UNAVAILABLE


class EngineUnavailable(EngineError):
    """The Docker engine cannot be reached: start dockerd or fix DOCKER_HOST."""

    type = "engine_unavailable"


class ImageLoadFailed(EngineError):
    """The engine refused an image tarball (``docker load`` failed)."""

    type = "image_load_failed"


class BaseImageFailed(EngineError):
    """The offline base image could not be made (debootstrap or import failed)."""

    type = "base_image_failed"


class TarballRejected(PfbuildError):
    """A cached tarball failed its checksum, its load or its tags; it was quarantined."""

    type = "tarball_rejected"

    @property
    def moved_to(self) -> str | None:
        return self.details.get("moved_to")


class RegistryFailed(PfbuildError):
    """The shared registry failed a push, pull or delete (a build falls back to the next
    tier instead of failing); check PFBUILD_REGISTRY and the registry's log."""

    type = "registry_failed"


class StorageError(PfbuildError):
    """The worker cannot read or write the files of a build (disk full, permissions)."""

    type = "storage_error"


class BuildFailed(PfbuildError):
    """The image build failed on every variant tried; see ``failure`` and the log."""

    type = "build_failed"
    exit_code = ExitCode.BUILD_FAILED


class LockLost(PfbuildError):
    """The worker's lock on the profile expired or was taken; it stopped publishing."""

    type = "lock_lost"


class BuildTimeout(BuildFailed):
    """The build ran past the worker's soft time limit; it was stopped and its lock freed."""

    type = "build_timeout"


class BuildIdleTimeout(BuildTimeout):
    """The build printed nothing for ``PFBUILD_IDLE_TIMEOUT`` seconds; it was stopped."""

    type = "build_idle_timeout"


class LockWaitExceeded(PfbuildError):
    """The profile stayed locked by another job past ``PFBUILD_LOCK_WAIT_MAX``."""

    type = "lock_wait_exceeded"


class DeliveriesExhausted(PfbuildError):
    """The job's worker died on each of ``PFBUILD_MAX_DELIVERIES`` starts; given up."""

    type = "deliveries_exhausted"


class InternalError(PfbuildError):
    """A bug in pfbuild: an unexpected exception, named in the message."""

    type = "internal_error"


class QueueUnavailable(PfbuildError):
    """The broker or result backend cannot be reached."""

    type = "queue_unavailable"
    exit_code = ExitCode.QUEUE_UNAVAILABLE


class NoWorkers(QueueUnavailable):
    """The job is queued on a Redis that no worker consumes (no live host, no answer to a
    ping): start workers there, or point PFBUILD_REDIS_URL at the farm's Redis. The job
    stays queued; ``details`` name it and the Redis."""

    type = "no_workers"


class JobTimeout(PfbuildError):
    """The job did not finish within the time the caller was willing to wait."""

    type = "timeout"
    exit_code = ExitCode.TIMEOUT


class JobLost(PfbuildError):
    """The job no longer exists (never sent, or its record was lost with Redis): submit again."""

    type = "job_lost"
    exit_code = ExitCode.LOST


class JobCancelled(PfbuildError):
    """The job was cancelled before it finished."""

    type = "cancelled"
    exit_code = ExitCode.CANCELLED


def _every_subclass(cls: type[PfbuildError]) -> list[type[PfbuildError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _every_subclass(sub)
    return found


_BY_TYPE: dict[str, type[PfbuildError]] = {cls.type: cls for cls in _every_subclass(PfbuildError)}
