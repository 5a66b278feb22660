"""One ``Settings`` object, read once from the environment (prefix ``PFBUILD_``) and passed down."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Every knob of pfbuild. Each field reads ``PFBUILD_<NAME>`` unless noted."""

    model_config = SettingsConfigDict(env_prefix="PFBUILD_", extra="ignore", populate_by_name=True)

    # --- queue -------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Broker and result backend. Unset: the CLI runs an embedded broker.",
    )

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
        description="Images are tagged {image_repository}/{profile_id}:latest.",
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
    zstd_level: int = Field(default=3, description="zstd level of saved tarballs.")
    zstd_threads: int = Field(default=2, description="zstd worker threads when saving.")

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

    def image_tag(self, profile_id: str) -> str:
        return f"{self.image_repository}/{profile_id}:latest"

    def base_image(self, version: str) -> str:
        return self.base_image_template.format(version=version)

    def docker_host_name(self) -> str:
        return self.docker_host or "unix:///var/run/docker.sock"
