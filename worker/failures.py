"""Reading a failed build's log: what rung of the ladder to try next, and why it failed.

The retry ladder (docs/design.md, "The retry ladder") climbs one rung per recognised
symptom: an apt repository that is gone moves to the Debian archive; unsigned or expired
keys add unauthenticated apt (only where policy allows it); missing C headers move to the
builder tier. When no rung is left, the failure is classified and counted in
``unsupported_registry.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pfbuild.client.models import Actionability, FailureClass, FailureInfo
from pfbuild.worker.artifacts import locked_json_update
from pfbuild.worker.render import Variant

__all__ = ["Symptoms", "classify", "next_variant", "read_symptoms", "record_unsupported"]


def _rx(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE | re.MULTILINE)


_REPO_GONE = _rx(
    r"does not have a Release file",
    r"404\s+Not Found",
    r"Failed to fetch .*(?:Release|InRelease)",
)
_KEYS_BAD = _rx(
    r"NO_PUBKEY",
    r"EXPKEYSIG",
    r"is not signed",
    r"The following signatures (?:were invalid|couldn't be verified)",
    r"Release file for .* is expired",
    r"KEYEXPIRED",
)
_HEADERS_MISSING = _rx(
    r"Python\.h: No such file or directory",
    r"longintrepr\.h",
    r"Could not build wheels for (?:cffi|typed[-_]ast|yarl)",
    r"fatal error: [^\n]*: No such file or directory",
    r"ffi\.h: No such file or directory",
)

# (failure class, patterns, actionability, remediation, retry when policy changes)
_CLASSES: list[tuple[FailureClass, re.Pattern[str], Actionability, str, bool]] = [
    (
        FailureClass.INVALID_REQUIREMENT,
        _rx(
            r"pkg[-_]resources\s*==\s*0\.0\.0",
            r"Invalid requirement",
            r"InvalidRequirement",
            r"Expected (?:end or semicolon|package name)",
        ),
        Actionability.DATASET_METADATA_ISSUE,
        "Fix the requirement in the profile's install commands (drop pkg-resources==0.0.0, "
        "correct malformed specifiers).",
        False,
    ),
    (
        FailureClass.PLATFORM_INCOMPATIBLE_DEPENDENCY,
        _rx(
            r"(?:No matching distribution|Could not find a version) .*\b(?:pywin32|pywinpty|"
            r"wmi|pythonnet|comtypes|winreg)\b",
            r"\b(?:pywin32|pywinpty)\b.*(?:not supported|only on Windows)",
        ),
        Actionability.DATASET_METADATA_ISSUE,
        "Remove Windows- or macOS-only dependencies, or guard them with environment "
        "markers (e.g. ; sys_platform == 'win32').",
        False,
    ),
    (
        FailureClass.MISSING_INSTALL_MECHANISM,
        _rx(
            r"Could not open requirements file",
            r"neither 'setup\.py' nor 'pyproject\.toml' found",
            r"does not appear to be a Python project",
            r"can't open file .*setup\.py",
            r"No such file or directory: '[^']*(?:requirements[^']*|setup\.py|pyproject\.toml)'",
        ),
        Actionability.DATASET_METADATA_ISSUE,
        "The install commands name a file or project the repository does not have; point "
        "them at the repository's real install mechanism.",
        False,
    ),
    (
        FailureClass.APT_FAILURE,
        _rx(
            r"^E: ",
            r"apt-get (?:update|install).* returned a non-zero code",
            _REPO_GONE.pattern,
            _KEYS_BAD.pattern,
        ),
        Actionability.INFRA_ISSUE,
        "The base image's apt sources are unusable; allow unauthenticated apt for this "
        "profile or move it to a newer Python base image.",
        True,
    ),
]


@dataclass(frozen=True)
class Symptoms:
    repo_gone: bool
    keys_bad: bool
    headers_missing: bool


def read_symptoms(log_text: str) -> Symptoms:
    return Symptoms(
        repo_gone=bool(_REPO_GONE.search(log_text)),
        keys_bad=bool(_KEYS_BAD.search(log_text)),
        headers_missing=bool(_HEADERS_MISSING.search(log_text)),
    )


def _at_most(version: str, limit: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    return parts(version) <= parts(limit)


def next_variant(
    current: Variant,
    symptoms: Symptoms,
    *,
    python_version: str,
    allow_unauth: bool,
    unauth_max_python: str,
) -> Variant | None:
    """The next rung of the ladder for these symptoms, or None when none applies."""
    builder, archive, unauth = current.builder, current.archive, current.unauth
    if symptoms.repo_gone and not archive:
        archive = True
    elif (
        symptoms.keys_bad
        and not unauth
        and allow_unauth
        and _at_most(python_version, unauth_max_python)
    ):
        archive = unauth = True
    elif symptoms.headers_missing and not builder:
        builder = True
    else:
        return None
    return Variant(builder=builder, archive=archive, unauth=unauth)


def classify(log_text: str) -> FailureInfo:
    """Classify a failed build from its log; anything unrecognised is a build_failure."""
    for failure_class, pattern, actionability, remediation, retry in _CLASSES:
        found = pattern.search(log_text)
        if found:
            return FailureInfo(
                failure_class=failure_class,
                actionability=actionability,
                remediation=remediation,
                retry_on_policy_change=retry,
                evidence=_line_of(log_text, found.start()),
            )
    last = [ln for ln in log_text.splitlines() if ln.strip()]
    return FailureInfo(
        failure_class=FailureClass.BUILD_FAILURE,
        actionability=Actionability.INFRA_ISSUE,
        remediation="Read the build log; if the install commands are right, retry the "
        "build (a network or mirror failure is often transient).",
        retry_on_policy_change=False,
        evidence=last[-1][:500] if last else "",
    )


def _line_of(text: str, index: int) -> str:
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text[start : end if end >= 0 else len(text)].strip()[:500]


def record_unsupported(
    registry: Path, profile_id: str, failure: FailureInfo, *, variant: str
) -> dict[str, Any]:
    """Count this failure in the registry: one entry per (profile, class) key."""
    key = f"{profile_id}:{failure.failure_class.value}"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def update(data: dict[str, Any]) -> dict[str, Any]:
        entries = data.setdefault("entries", {})
        entry = entries.get(key) or {"first_seen": now, "count": 0}
        entry.update(
            profile_id=profile_id,
            failure_class=failure.failure_class.value,
            actionability=failure.actionability.value,
            remediation=failure.remediation,
            retry_on_policy_change=failure.retry_on_policy_change,
            last_variant=variant,
            last_evidence=failure.evidence,
            last_seen=now,
            count=int(entry.get("count", 0)) + 1,
        )
        entries[key] = entry
        data["schema_version"] = 1
        return dict(entry)

    return locked_json_update(registry, update)
