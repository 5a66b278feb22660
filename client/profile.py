"""Repo profiles: loading, validation, ``profile_id`` and the Python version.

The rules are in docs/design.md ("The profile").

Validation refuses rather than rewrites: a value that would change the Dockerfile's
meaning (a newline in a command, a non-identifier env key, an id Docker cannot name) is a
:class:`~pfbuild.client.errors.BadRequest`, raised before anything is built or written.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from pfbuild.client.errors import BadRequest, LimitExceeded, ProfileRefused
from pfbuild.client.inputs import (
    JsonLimits,
    check_path_text,
    check_value,
    loads_strict,
    read_bounded,
)
from pfbuild.client.models import BuildRequest
from pfbuild.client.settings import Settings

__all__ = [
    "DEFAULT_PYTHON",
    "Profile",
    "canonical_json",
    "compute_profile_id",
    "load_profile_file",
    "parse_profile",
    "python_version",
    "validate_request",
]

DEFAULT_PYTHON = "3.11"

# Docker's grammar for one path component of an image name.
_ID_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Dotted runs of digits ("3.11.2"); greedy and unambiguous, so one pass over the text.
_VERSION_RUN = re.compile(r"\d+(?:\.\d+)*")
# Characters that end a Dockerfile line (or, for NUL, truncate it) and so could smuggle in
# a new instruction.
_LINE_BREAKS = ("\n", "\r", "\x00")


class Profile(BaseModel):
    """A validated repo profile. Unknown fields are kept in ``raw`` (they count in the id)."""

    model_config = ConfigDict(frozen=True)

    profile_id: str
    python_version: str
    install_cmds: tuple[str, ...]
    env: dict[str, str]
    allow_unauthenticated_apt: bool = True
    policy_profile: str | None = None
    working_dir: str | None = None
    raw: dict[str, Any] = Field(repr=False)


class _Fields(BaseModel):
    """Types of the known fields; strict, so a wrong type is refused, never coerced."""

    model_config = ConfigDict(extra="allow", strict=True)

    python_version_target: StrictStr | None = None
    install_cmds: list[StrictStr] = Field(default_factory=list)
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    status: StrictStr | None = None
    policy_profile: StrictStr | None = None
    allow_unauthenticated_apt: StrictBool = True
    working_dir: StrictStr | None = None


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and compact separators: the same text for the same value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compute_profile_id(profile: dict[str, Any]) -> str:
    """sha256 of the canonical profile with ``working_dir`` set to ``"."``."""
    body = dict(profile)
    body["working_dir"] = "."
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def python_version(target: str | None) -> str:
    """Pick the Python version: ``X.Y.Z``/``X.Y`` as is, else the first found, else 3.11.

    One pass of a regex that cannot backtrack: the runs of dotted digits, in order (a
    search for ``\\d+\\.\\d+\\.\\d+`` from every digit would be quadratic in a long number).
    """
    runs = [run.split(".") for run in _VERSION_RUN.findall((target or "").strip())]
    for parts in (3, 2):
        for run in runs:
            if len(run) >= parts:
                return ".".join(run[:parts])
    return f"{runs[0][0]}.0" if runs else DEFAULT_PYTHON


def _check_id(profile_id: object) -> str:
    if not isinstance(profile_id, str):
        raise BadRequest(f"profile_id must be a string, got {type(profile_id).__name__}")
    if len(profile_id) > 128 or not _ID_RE.fullmatch(profile_id):
        raise BadRequest(
            f"invalid profile_id {profile_id!r}: use at most 128 lowercase letters and digits, "
            "separated by single '.', '_', '__' or runs of '-', starting and ending with a "
            "letter or digit"
        )
    return profile_id


def _no_line_breaks(what: str, value: str) -> None:
    for ch in _LINE_BREAKS:
        if ch in value:
            raise BadRequest(
                f"{what} contains {ch!r}: newlines, carriage returns and NUL are refused "
                "because they would inject Dockerfile instructions"
            )


def _problems(exc: ValidationError, what: str) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or what}: {err['msg']}" for err in exc.errors()
    )


def validate_request(data: object, settings: Settings | None = None) -> BuildRequest:
    """A BuildRequest from decoded JSON; every problem is a BadRequest naming the field.

    The CLI, the client and the worker all call this, so all three refuse the same
    requests (non-JSON values, lone surrogates, NUL or over-long paths).
    """
    settings = settings or Settings()
    if isinstance(data, BuildRequest):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise BadRequest("the request must be a JSON object")
    check_value(data, what="the request", limits=JsonLimits.of(settings))
    try:
        request = BuildRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(f"invalid request: {_problems(exc, 'request')}") from None
    for name in ("repo_dir", "profile_path", "image_cache_dir"):
        value = getattr(request, name)
        if value is not None:
            check_path_text(value, what=name, max_length=settings.max_path_length)
    return request


def _limit(what: str, size: int, setting: str, settings: Settings) -> None:
    limit = getattr(settings, setting)
    if size > limit:
        raise LimitExceeded(
            f"{what} is over the limit of {limit} ({size}); set PFBUILD_{setting.upper()} "
            "to change it",
            details={"setting": setting, "limit": limit},
        )


def _check_sizes(fields: _Fields, source: str, settings: Settings) -> None:
    """Counts and lengths the engine would choke on (or take hours over) are refused here."""
    _limit(f"{source}: install_cmds count", len(fields.install_cmds), "max_install_cmds", settings)
    _limit(f"{source}: env entry count", len(fields.env), "max_env_entries", settings)
    _limit(
        f"{source}: python_version_target length",
        len(fields.python_version_target or ""),
        "max_version_length",
        settings,
    )
    for i, cmd in enumerate(fields.install_cmds):
        size = len(cmd.encode("utf-8"))
        _limit(f"{source}: install_cmds[{i}] length", size, "max_command_length", settings)
    for key, value in fields.env.items():
        _limit(f"{source}: env key {key[:40]!r}… length", len(key), "max_env_key_length", settings)
        size = len(value.encode("utf-8"))
        _limit(f"{source}: env[{key!r}] length", size, "max_env_value_length", settings)


def parse_profile(
    document: object, *, source: str = "profile", settings: Settings | None = None
) -> Profile:
    """Validate a profile document: the profile itself or ``{"profile_id", "profile"}``."""
    settings = settings or Settings()
    if not isinstance(document, dict):
        raise BadRequest(f"{source}: a profile must be a JSON object")
    check_value(document, what=source, limits=JsonLimits.of(settings))
    given_id: object = None
    body: object = document
    if "profile" in document and set(document) <= {"profile", "profile_id"}:
        body = document["profile"]
        given_id = document.get("profile_id")
        if not isinstance(body, dict):
            raise BadRequest(f"{source}: 'profile' must be a JSON object")
    assert isinstance(body, dict)
    try:
        fields = _Fields.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(f"{source}: wrong types in profile: {_problems(exc, 'profile')}") from None
    _check_sizes(fields, source, settings)

    if fields.status == "unsupported":
        raise ProfileRefused(f"{source}: profile status is 'unsupported'; refusing to build")
    commands = tuple(c for c in fields.install_cmds if c.strip())
    if not commands:
        raise ProfileRefused(f"{source}: 'install_cmds' is empty; nothing would be installed")
    for i, cmd in enumerate(fields.install_cmds):
        _no_line_breaks(f"install_cmds[{i}]", cmd)
        if cmd.lstrip().startswith("-"):
            raise BadRequest(
                f"install_cmds[{i}] starts with '-': Docker would read it as a flag of RUN "
                "(--network, --mount, --security), not as a command"
            )
        if cmd.rstrip().endswith("\\"):
            raise BadRequest(
                f"install_cmds[{i}] ends with a backslash, which would continue the RUN "
                "instruction onto the next line of the Dockerfile"
            )
    for key, value in fields.env.items():
        if not _ENV_KEY_RE.fullmatch(key):
            raise BadRequest(f"env key {key!r} is not a shell identifier ([A-Za-z_][A-Za-z0-9_]*)")
        _no_line_breaks(f"env[{key!r}]", value)

    profile_id = _check_id(given_id) if given_id is not None else compute_profile_id(body)
    return Profile(
        profile_id=profile_id,
        python_version=python_version(fields.python_version_target),
        install_cmds=commands,
        env=dict(fields.env),
        allow_unauthenticated_apt=fields.allow_unauthenticated_apt,
        policy_profile=fields.policy_profile,
        working_dir=fields.working_dir,
        raw=dict(body),
    )


def load_profile_file(path: str | Path, settings: Settings | None = None) -> dict[str, Any]:
    """Read a profile file as strict JSON, turning every reading problem into a BadRequest.

    Only a regular file is read (a FIFO or ``/dev/zero`` is refused before a byte is
    read), and at most ``max_request_bytes`` of it.
    """
    settings = settings or Settings()
    p = Path(path)
    check_path_text(str(p), what="profile_path", max_length=settings.max_path_length)
    data = read_bounded(
        p, what="profile_path", limit=settings.max_request_bytes, setting="max_request_bytes"
    )
    document = loads_strict(data, what=f"profile_path {str(p)!r}", limits=JsonLimits.of(settings))
    if not isinstance(document, dict):
        raise BadRequest(f"profile_path {str(p)!r} must hold a JSON object")
    return document
