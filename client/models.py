"""The contract: every message that crosses a process boundary, as pydantic models.

The request and answer keep the seed builder's fields (``repo_dir``, ``profile_path``,
``image_cache_dir``, ``force_rebuild`` in; ``image_tag``, ``profile_id``, ``reused_cache``,
``build_log_path`` out) and add to them; nothing here imports the docker SDK, so agents
can install the client thin.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Actionability",
    "Attempt",
    "BuildAnswer",
    "BuildRequest",
    "CacheSource",
    "ErrorInfo",
    "FailureClass",
    "FailureInfo",
    "JobState",
    "Manifest",
    "Publication",
    "PublishKind",
    "PublishState",
    "RegistryInfo",
    "TarballInfo",
    "Timings",
]

CacheSource = Literal["local", "registry", "tarball", "built"]


class JobState(str, Enum):
    """What a client sees of a job, in the order a build goes through them.

    The one type for a stage: the worker reports it, the result backend stores it (as
    :attr:`celery_state`), the client reads it back, and :attr:`timing` names the field
    of :class:`Timings` its seconds add to.
    """

    QUEUED = "queued"
    WAITING_FOR_LOCK = "waiting_for_lock"
    RENDERING = "rendering"
    CHECKING_CACHE = "checking_cache"
    PULLING_IMAGE = "pulling_image"
    LOADING_TARBALL = "loading_tarball"
    BUILDING = "building"
    SAVING_TARBALL = "saving_tarball"
    PUSHING_IMAGE = "pushing_image"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"
    LOST = "lost"  # neither an answer nor a record: never sent, or wiped with Redis

    @property
    def ready(self) -> bool:
        return self in (JobState.SUCCESS, JobState.FAILURE, JobState.CANCELLED, JobState.LOST)

    @property
    def celery_state(self) -> str:
        """The custom Celery state a worker stores for this stage (``BUILDING``, ...)."""
        return self.value.upper()

    @property
    def timing(self) -> str | None:
        """The :class:`Timings` field this stage's seconds add to, if it is timed."""
        return _TIMING_OF.get(self)


class FailureClass(str, Enum):
    """Why a build failed, read from its log (see docs/design.md, "Failure classes")."""

    MISSING_INSTALL_MECHANISM = "missing_install_mechanism"
    INVALID_REQUIREMENT = "invalid_requirement"
    PLATFORM_INCOMPATIBLE_DEPENDENCY = "platform_incompatible_dependency"
    APT_FAILURE = "apt_failure"
    BUILD_FAILURE = "build_failure"


class Actionability(str, Enum):
    """Who can fix a failure: the infrastructure, or the dataset's metadata."""

    INFRA_ISSUE = "infra_issue"
    DATASET_METADATA_ISSUE = "dataset_metadata_issue"


class FailureInfo(BaseModel):
    """A classified build failure."""

    failure_class: FailureClass
    actionability: Actionability
    remediation: str
    retry_on_policy_change: bool
    evidence: str = ""


class ErrorInfo(BaseModel):
    """A structured error, as sent over JSON in place of a traceback."""

    type: str
    message: str
    failure: FailureInfo | None = None
    build_log_path: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class BuildRequest(BaseModel):
    """One build request (the seed's stdin object, plus an inline ``profile``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    repo_dir: str = Field(min_length=1)
    profile_path: str | None = None
    profile: dict[str, Any] | None = None
    image_cache_dir: str | None = None
    force_rebuild: bool = False

    @model_validator(mode="after")
    def _one_profile_source(self) -> BuildRequest:
        if self.profile is None and self.profile_path is None:
            raise ValueError("give either 'profile_path' or an inline 'profile'")
        if self.profile is not None and self.profile_path is not None:
            raise ValueError("give 'profile_path' or 'profile', not both")
        return self


class Attempt(BaseModel):
    """One build attempt with one Dockerfile variant."""

    variant: str
    ok: bool
    seconds: float
    failure: FailureInfo | None = None
    dockerfile_path: str


class Timings(BaseModel):
    """Seconds spent in each stage; stages that did not run stay at 0."""

    queue_wait: float = 0.0
    lock_wait: float = 0.0
    render: float = 0.0
    cache_check: float = 0.0
    load: float = 0.0
    build: float = 0.0
    save: float = 0.0
    pull: float = 0.0
    push: float = 0.0
    total: float = 0.0


_TIMING_OF = {
    JobState.WAITING_FOR_LOCK: "lock_wait",
    JobState.RENDERING: "render",
    JobState.CHECKING_CACHE: "cache_check",
    JobState.LOADING_TARBALL: "load",
    JobState.BUILDING: "build",
    JobState.SAVING_TARBALL: "save",
    JobState.PULLING_IMAGE: "pull",
    JobState.PUSHING_IMAGE: "push",
}


class TarballInfo(BaseModel):
    """The tarball the image was loaded from or saved to."""

    path: str
    sha256: str | None = None
    size: int
    compression: Literal["zstd", "gzip", "none"]


class RegistryInfo(BaseModel):
    """The registry image the image was pulled from or pushed to."""

    reference: str
    digest: str
    bytes: int = 0  # layer bytes that crossed the network (shared layers cost nothing)


PublishKind = Literal["tarball", "registry"]
PublishState = Literal["pending", "done", "failed"]


class Publication(BaseModel):
    """One publication of a new image for other hosts (docs/design.md, "Publishing").

    ``pending`` when the answer goes out (the image is on the engine; publishing follows
    on the worker that built it), then ``done`` or ``failed`` with its ``reason``.
    """

    state: PublishState
    target: str | None = None  # the tarball's path, or the registry reference
    reason: str | None = None  # why it failed
    seconds: float | None = None  # how long it took, once finished
    bytes: int | None = None  # what it wrote: the tarball's size, the layer bytes pushed
    finished_at: str | None = None


class Manifest(BaseModel):
    """What ``manifest.json`` records about one image."""

    schema_version: int = 1
    profile_id: str
    image_tag: str
    image_id: str
    build_variant: str
    python_version: str
    base_image: str
    dockerfile_sha256: str
    context_sha256: str = ""  # the code in the image (docs/design.md, "What a hit means")
    cache_source: CacheSource
    force_rebuild: bool
    attempts: list[Attempt]
    tarball: TarballInfo | None = None
    registry: RegistryInfo | None = None
    # each publication of a new image: tarball and registry, pending until it lands
    publications: dict[PublishKind, Publication] = Field(default_factory=dict)
    worker: str
    docker_host: str
    created_at: str
    pfbuild_version: str
    events: list[str] = Field(default_factory=list)


class BuildAnswer(BaseModel):
    """The answer to a build request: the seed's fields plus where and how it was made."""

    image_tag: str
    profile_id: str
    reused_cache: bool
    build_log_path: str
    cache_source: CacheSource
    image_id: str
    context_sha256: str = ""
    build_variant: str
    manifest: Manifest
    manifest_path: str
    dockerfile_path: str
    timings: Timings
    worker: str
    docker_host: str
    attempts: list[Attempt]
