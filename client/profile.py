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

from pfbuild.client.errors import BadRequest, ProfileRefused
from pfbuild.client.models import BuildRequest

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
    """Pick the Python version: ``X.Y.Z``/``X.Y`` as is, else the first found, else 3.11."""
    text = (target or "").strip()
    if re.fullmatch(r"\d+\.\d+(?:\.\d+)?", text):
        return text
    for pattern in (r"\d+\.\d+\.\d+", r"\d+\.\d+"):
        found = re.search(pattern, text)
        if found:
            return found.group(0)
    major = re.search(r"\d+", text)
    if major:
        return f"{major.group(0)}.0"
    return DEFAULT_PYTHON


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


def validate_request(data: object) -> BuildRequest:
    """A BuildRequest from decoded JSON; every problem is a BadRequest naming the field."""
    if isinstance(data, BuildRequest):
        return data
    if not isinstance(data, dict):
        raise BadRequest("the request must be a JSON object")
    try:
        return BuildRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(f"invalid request: {_problems(exc, 'request')}") from None


def parse_profile(document: object, *, source: str = "profile") -> Profile:
    """Validate a profile document: the profile itself or ``{"profile_id", "profile"}``."""
    if not isinstance(document, dict):
        raise BadRequest(f"{source}: a profile must be a JSON object")
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

    if fields.status == "unsupported":
        raise ProfileRefused(f"{source}: profile status is 'unsupported'; refusing to build")
    commands = tuple(c for c in fields.install_cmds if c.strip())
    if not commands:
        raise ProfileRefused(f"{source}: 'install_cmds' is empty; nothing would be installed")
    for i, cmd in enumerate(fields.install_cmds):
        _no_line_breaks(f"install_cmds[{i}]", cmd)
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


def load_profile_file(path: str | Path) -> dict[str, Any]:
    """Read a profile file as JSON, turning every reading problem into a BadRequest."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadRequest(f"profile_path {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise BadRequest(f"profile_path {str(p)!r} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read profile_path {str(p)!r}: {exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"profile_path {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest(f"profile_path {str(p)!r} must hold a JSON object")
    return document
