"""One ``Settings`` object, read once from the environment (prefix ``PFBUILD_``) and passed down."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["CODE_HEX", "LATEST", "Settings", "code_of", "is_code"]

LATEST = "latest"
# hex digits of the context digest in a code tag: a collision of 48 bits within one profile
# is not a false hit either, since every hit compares the image's whole digest label
CODE_HEX = 12


def code_of(context_sha256: str) -> str:
    """The tag of the code whose context digest is ``context_sha256``."""
    return context_sha256[:CODE_HEX]


def is_code(tag: str) -> bool:
    """Whether ``tag`` (the part after ``:``) is a code tag rather than ``latest``."""
    return len(tag) == CODE_HEX and all(c in "0123456789abcdef" for c in tag)


class Settings(BaseSettings):
    """Every knob of pfbuild. Each field reads ``PFBUILD_<NAME>`` unless noted."""

    model_config = SettingsConfigDict(env_prefix="PFBUILD_", extra="ignore", populate_by_name=True)

    # --- queue -------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Broker and result backend, and every Redis use of pfbuild: "
        "redis://HOST:PORT/DB, or Celery's Sentinel form "
        "sentinel://HOST:PORT;sentinel://HOST:PORT;sentinel://HOST:PORT/DB (optional "
        ":PASSWORD@, the master's) to follow the master through a failover. Unset: the CLI "
        "runs an embedded broker.",
    )
    redis_sentinel_master: str = Field(
        default="mymaster",
        min_length=1,
        description="With a sentinel:// redis_url, the name the Sentinels monitor the "
        "master under (their `sentinel monitor NAME ...`).",
    )

    build_soft_time_limit: int = Field(
        default=3600,
        description="Seconds before a build is asked to stop (it releases its lock and "
        "fails with a structured timeout error).",
    )
    build_time_limit: int = Field(
        default=3900, description="Seconds before a build's process is killed outright."
    )
    lock_ttl: int = Field(
        default=60,
        description="Seconds a profile lock lives without renewal; a watchdog renews it "
        "every third of that while the build runs, so a dead worker's lock frees itself.",
    )
    lock_poll_seconds: float = Field(
        default=2.0,
        description="How often each worker sweeps the lock wait lists: a job parked on a "
        "lock whose holder died (or past lock_wait_max) is sent again.",
    )
    lock_wait_max: int = Field(
        default=7200, description="Seconds a job may wait for a profile lock before failing."
    )
    max_deliveries: int = Field(
        default=3,
        description="A job whose worker died this many times is failed, not redelivered.",
    )
    visibility_timeout: int = Field(
        default=120,
        description="Seconds after which the broker hands an unacknowledged job to another "
        "worker. A running job's heartbeat keeps its delivery fresh, so this bounds how long "
        "a dead host's job waits, not how long a build may run.",
    )
    job_heartbeat_seconds: float = Field(
        default=10.0,
        description="How often a worker renews a running job's heartbeat (it lives three "
        "times as long) and its delivery's place in the broker's unacked index.",
    )
    send_grace: float = Field(
        default=10.0,
        description="Seconds a submitter has, after claiming a flight, to send its job. A "
        "flight whose job was never sent (the submitter died in between) is abandoned after "
        "this, and its waiters get JobLost.",
    )
    wait_timeout: float = Field(
        default=4 * 3600.0,
        description="Seconds `result()` and `--wait` wait for an answer when not told.",
    )
    no_worker_grace: float = Field(
        default=1.5,
        ge=0,
        description="Seconds `submit --wait` waits for a job to leave `queued` before it "
        "asks whether any worker consumes this Redis (live hosts, then a ping); with none, "
        "it reports NoWorkers (exit 5) unless told to wait for workers. 0: never asks.",
    )
    wait_for_workers: bool = Field(
        default=False,
        description="`submit --wait` keeps waiting when no worker consumes this Redis, "
        "after saying so on stderr (as `--wait-for-workers`).",
    )
    redis_socket_timeout: float = Field(
        default=2.0,
        description="Seconds any Redis call of a client may take (connect or reply), so "
        "that a Redis that accepts but never answers is an error, not a hang.",
    )
    worker_redis_socket_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds any Redis call of a worker's own may take (its jobs' locks, "
        "records and heartbeats; not Celery's broker connection): a Redis that accepts but "
        "never answers fails the call, and the job is handed back, instead of hanging it. "
        "Set here rather than left to redis-py, whose default has changed between releases.",
    )
    redis_outage_tolerance: float = Field(
        default=30.0,
        description="Seconds a waiting client keeps retrying while Redis cannot be reached, "
        "before it raises QueueUnavailable.",
    )
    result_expires: int = Field(
        default=86400, description="Seconds results, job logs and cancel flags are kept."
    )
    log_keep_lines: int = Field(
        default=50_000,
        description="Build log lines kept per job in Redis for `pfbuild logs`; the whole "
        "log is always in build.log.",
    )
    worker_concurrency: int = Field(default=2, description="Builds one worker runs at once.")

    # --- where things go ---------------------------------------------------------------
    tmp_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("PFBUILD_TMP_DIR", "PF_TMP_DIR"),
        description="Default tarball cache is {tmp_dir}/image-cache (the seed's PF_TMP_DIR).",
    )
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="repo_dir must lie under one of these (JSON list). Empty: no limit.",
    )

    # --- images ------------------------------------------------------------------------
    base_image_template: str = Field(
        default="python:{version}-slim",
        description="The FROM image; {version} is the profile's Python version.",
    )
    image_repository: str = Field(
        default="patchfoundry",
        description="Images are tagged {image_repository}/{profile_id}:latest (the "
        "profile's newest build) and {image_repository}/{profile_id}:{code} (the code in "
        "the image: the first 12 hex of its context digest).",
    )
    debian_archive_url: str = Field(
        default="http://archive.debian.org",
        description="Where the archive variants point apt (it serves /debian and "
        "/debian-security for releases that left the mirrors).",
    )
    unauth_apt_max_python: str = Field(
        default="3.8",
        description="Unauthenticated apt is tried only for Python at or below this version.",
    )
    registry: str | None = Field(
        default=None,
        description="host:port of a Docker registry shared by every host: a worker pushes "
        "each image it builds to {registry}/{image_repository}/{profile_id}:{code} and :latest, "
        "and pulls from there (its code's tag first) on a miss of its engine, before it looks "
        "at tarballs. Unset: no registry.",
    )
    tarball_cache: bool = Field(
        default=True,
        description="Save a tarball of each image built. With a registry set, turning it off "
        "saves the tarball's time and disk (the registry stores shared layers once).",
    )
    publish_detached: bool = Field(
        default=False,
        description="Publish each new image (tarball, registry push) from a process of "
        "its own that outlives the worker, instead of a thread of the worker's (as the "
        "embedded default of `pfbuild submit --wait` always does, so the command exits as "
        "soon as it has its answer).",
    )
    publish_niceness: int = Field(
        default=10,
        ge=0,
        le=19,
        description="How much lower a publication's CPU priority is than the worker's "
        "(nice): on a busy host, builds and answers come first and publications land "
        "later. 0: the same priority.",
    )
    publish_sweep_seconds: float = Field(
        default=30.0,
        description="How often each worker looks for publications of its host that a "
        "publisher left pending when it died, and finishes them. 0: only the next job of "
        "the profile does.",
    )
    zstd_level: int = Field(default=3, description="zstd level of saved tarballs.")
    zstd_threads: int = Field(default=2, description="zstd worker threads when saving.")

    # --- limits on what a request may ask (hostile input is refused, never sent on) ----
    max_request_bytes: int = Field(
        default=1024 * 1024,
        description="Largest request (JSON on stdin or sent to a worker), and largest "
        "profile file, in bytes.",
    )
    max_json_depth: int = Field(
        default=32, description="Deepest nesting of objects and arrays in a request or profile."
    )
    max_number_digits: int = Field(
        default=100, description="Longest number (in characters) in a request or profile."
    )
    max_path_length: int = Field(
        default=4096, description="Longest repo_dir, profile_path or image_cache_dir."
    )
    max_install_cmds: int = Field(default=200, description="Most install commands in a profile.")
    max_command_length: int = Field(
        default=16384, description="Longest install command, in UTF-8 bytes."
    )
    max_env_entries: int = Field(default=200, description="Most env entries in a profile.")
    max_env_key_length: int = Field(default=256, description="Longest env key, in characters.")
    max_env_value_length: int = Field(
        default=16384, description="Longest env value, in UTF-8 bytes."
    )
    max_version_length: int = Field(
        default=64, description="Longest python_version_target, in characters."
    )
    idle_timeout: int = Field(
        default=1800,
        description="Seconds a build may print nothing before it is stopped with a "
        "BuildIdleTimeout (an install command waiting on stdin, a hung download). 0: never.",
    )
    state_dir: Path | None = Field(
        default=None,
        description="Worker-side state no repository can write: the records of the "
        "tarballs pfbuild saved, the only ones its cache loads. Default {tmp_dir}/state, else "
        "~/.local/state/pfbuild. Share it between hosts that share a tarball cache.",
    )

    # --- this worker -------------------------------------------------------------------
    docker_host: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PFBUILD_DOCKER_HOST", "DOCKER_HOST"),
        description="The Docker engine this worker talks to (default: the local socket).",
    )
    host_id: str = Field(
        default_factory=socket.gethostname,
        description="Names this worker's Docker host in answers and in the host registry.",
    )
    docker_timeout: int = Field(default=600, description="Seconds for one engine API call.")
    image_watch_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long a worker keeps what an image inspect found while the engine's "
        "image events report no change (a cache hit then skips the engine). 0: ask each time.",
    )

    # --- operating the farm (metrics, logs, garbage collection) --------------------------
    metrics_port: int = Field(
        default=9808,
        description="Port of the worker's Prometheus endpoint (/metrics). 0: none. Two "
        "workers on one machine need two ports.",
    )
    metrics_dir: Path | None = Field(
        default=None,
        description="prometheus_client's multiprocess folder (emptied when the worker "
        "starts). Default: a fresh folder under the system's temp dir.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="How the worker logs each job's stage changes: text, or one JSON "
        "object a line (`pfbuild worker --log-format json`).",
    )
    gc_interval_seconds: float = Field(
        default=600.0,
        description="How often each worker collects garbage on its host. 0: never (run "
        "`pfbuild gc` yourself).",
    )
    gc_max_images: int = Field(
        default=50,
        description="Images of profiles a host keeps; beyond it the least recently used "
        "go first. 0: no limit. Dangling images left by rebuilds are always collected.",
    )
    gc_dangling_grace_seconds: float = Field(
        default=3600.0,
        description="A dangling image (left untagged by a rebuild) stays this long after "
        "its profile's last use: an agent may still run its gates on the image_id it was "
        "answered.",
    )
    gc_max_tarball_bytes: int = Field(
        default=50 * 2**30,
        description="Bytes each tarball cache folder may hold; beyond it the least "
        "recently used tarballs go first. 0: no limit.",
    )
    gc_max_registry_images: int = Field(
        default=0,
        description="Profiles' images the shared registry keeps (with PFBUILD_REGISTRY set); "
        "beyond it `pfbuild gc --registry` deletes the least recently used manifests across "
        "the farm, and the registry's own `garbage-collect` frees their layers. 0: no limit.",
    )
    gc_cache_dirs: list[Path] = Field(
        default_factory=list,
        description="Tarball cache folders to collect besides {tmp_dir}/image-cache "
        "(JSON list): the `image_cache_dir` agents send.",
    )

    # --- many hosts --------------------------------------------------------------------
    heartbeat_seconds: float = Field(
        default=5.0,
        description="How often a worker renews its host's heartbeat in Redis and re-reads "
        "which profiles' images its engine holds.",
    )
    host_ttl: int = Field(
        default=20,
        description="Seconds a host's heartbeat lives: a host silent this long is dead, its "
        "queue's jobs go back to the shared queue and no request is routed to it.",
    )
    routing: bool = Field(
        default=True,
        description="Send each request to a live host that holds its image (else the host "
        "its base image hashes to, else the shared queue). Off: the shared queue only.",
    )
    client_hits: bool = Field(
        default=True,
        description="A client answers a hit itself, with no worker round trip, when the "
        "checkout's stat fingerprint is the one it had when a worker answered it, and a "
        "live host still holds that answer's image under its code tag (client/hits.py); "
        "and the command line answers a hit it answered before, for an unchanged checkout, "
        "before it loads itself (client/quickhit.py). Off: every request goes the whole "
        "way.",
    )
    max_handbacks: int = Field(
        default=2,
        ge=0,
        description="How many times a job may be handed to another host because the engine "
        "of the host that took it does not answer; past it (or when no other host's engine "
        "answers) the job fails with EngineUnavailable. 0: never handed back.",
    )

    @property
    def job_heartbeat_ttl(self) -> float:
        """A job's heartbeat not renewed for three periods means its worker is gone."""
        return 3 * self.job_heartbeat_seconds

    @property
    def flight_ttl(self) -> int:
        """How long a single-flight key may live: the longest build, plus as long again
        queued behind others, plus the longest lock wait."""
        return 2 * self.build_time_limit + self.lock_wait_max

    def image_tag(self, profile_id: str) -> str:
        """The profile's newest build: ``{image_repository}/{profile_id}:latest``."""
        return f"{self.image_repository}/{profile_id}:{LATEST}"

    def code_tag(self, profile_id: str, context_sha256: str) -> str:
        """The image of this very code: ``{image_repository}/{profile_id}:{code}``, the code
        being the first 12 hex of the context digest (docs/design.md, "What a hit means")."""
        return f"{self.image_repository}/{profile_id}:{code_of(context_sha256)}"

    def registry_ref(self, profile_id: str, tag: str = "latest") -> str | None:
        """Where the registry tier keeps a profile's image under ``tag`` (``latest`` or a
        code, :func:`code_of`), or None without a registry."""
        if not self.registry:
            return None
        return f"{self.registry}/{self.image_repository}/{profile_id}:{tag}"

    def base_image(self, version: str) -> str:
        return self.base_image_template.format(version=version)

    def trust_dir(self) -> Path:
        """Where the digests of the tarballs pfbuild saved are recorded."""
        if self.state_dir is not None:
            return self.state_dir / "trusted-tarballs"
        if self.tmp_dir is not None:
            return self.tmp_dir / "state" / "trusted-tarballs"
        return Path.home() / ".local" / "state" / "pfbuild" / "trusted-tarballs"

    def publish_dir(self) -> Path:
        """Where this host records the publications of its new images (next to the
        trust records; one folder per host, since hosts may share the state folder)."""
        return self.trust_dir().parent / "publications" / self.host_id

    def docker_host_name(self) -> str:
        return self.docker_host or "unix:///var/run/docker.sock"
