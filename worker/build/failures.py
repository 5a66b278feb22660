"""Reading a failed build's log: what rung of the ladder to try next, and why it failed.

The retry ladder (docs/design.md, "The retry ladder") climbs one rung per recognised
symptom: an apt repository that is gone moves to the Debian archive; unsigned or expired
keys add unauthenticated apt (only where policy allows it); missing C headers move to the
builder tier. When no rung is left, the failure is classified and counted in
``unsupported_registry.json``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pfbuild.client.models import Actionability, FailureClass, FailureInfo
from pfbuild.worker.artifacts import locked_json_update
from pfbuild.worker.build.render import Variant

__all__ = ["Symptoms", "classify", "next_variant", "read_symptoms", "record_unsupported"]


# Every pattern runs in time linear in the log, whatever the log holds. Plain patterns
# have no wildcard to backtrack over; a "first ... then" pattern (``A.*B`` in regex terms,
# quadratic on a line holding many A's and no B) finds the first A of a line, then looks
# for B in the rest of that line once, and moves on to the next line.


class _Then:
    """``first``, then ``then`` after it on the same line: ``first.*then``, in linear time."""

    def __init__(self, first: str, then: str | Callable[[str, int, int], bool]) -> None:
        self.first = re.compile(first, re.IGNORECASE | re.MULTILINE)
        if callable(then):
            self.then = then
        else:
            rest = re.compile(then, re.IGNORECASE)
            self.then = lambda text, start, end: rest.search(text, start, end) is not None

    def find(self, text: str) -> int | None:
        """Where the first matching line's match starts, or None."""
        pos = 0
        while (found := self.first.search(text, pos)) is not None:
            eol = text.find("\n", found.end())
            eol = len(text) if eol < 0 else eol
            if self.then(text, found.end(), eol):
                return found.start()
            pos = eol + 1
        return None


class _Any:
    """Any of ``patterns``: plain regexes (no wildcards), :class:`_Then`, or other groups."""

    def __init__(self, *patterns: str | _Then | _Any) -> None:
        plain = [p for p in patterns if isinstance(p, str)]
        joined = "|".join(f"(?:{p})" for p in plain)
        self.regex = re.compile(joined, re.IGNORECASE | re.MULTILINE) if plain else None
        self.others: list[_Then | _Any] = [p for p in patterns if not isinstance(p, str)]

    def find(self, text: str) -> int | None:
        """Where the earliest match starts, or None."""
        found = self.regex.search(text) if self.regex is not None else None
        starts = [found.start()] if found else []
        starts += [i for i in (p.find(text) for p in self.others) if i is not None]
        return min(starts, default=None)


def _quoted_install_file(text: str, start: int, end: int) -> bool:
    """The quoted name at ``start`` is a requirements file, setup.py or pyproject.toml."""
    quote = text.find("'", start, end)
    name = text[start:quote].lower() if quote >= 0 else ""
    return "requirements" in name or name.endswith(("setup.py", "pyproject.toml"))


_REPO_GONE = _Any(
    r"does not have a Release file",
    r"404\s+Not Found",
    _Then(r"Failed to fetch ", r"Release|InRelease"),
)
_KEYS_BAD = _Any(
    r"NO_PUBKEY",
    r"EXPKEYSIG",
    r"is not signed",
    r"The following signatures (?:were invalid|couldn't be verified)",
    _Then(r"Release file for ", r" is expired"),
    r"KEYEXPIRED",
)
_HEADERS_MISSING = _Any(
    r"Python\.h: No such file or directory",
    r"longintrepr\.h",
    r"Could not build wheels for (?:cffi|typed[-_]ast|yarl)",
    _Then(r"fatal error: ", r": No such file or directory"),
    r"ffi\.h: No such file or directory",
)

# (failure class, patterns, actionability, remediation, retry when policy changes)
_CLASSES: list[tuple[FailureClass, _Any, Actionability, str, bool]] = [
    (
        FailureClass.INVALID_REQUIREMENT,
        _Any(
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
        _Any(
            _Then(
                r"(?:No matching distribution|Could not find a version) ",
                r"\b(?:pywin32|pywinpty|wmi|pythonnet|comtypes|winreg)\b",
            ),
            _Then(r"\b(?:pywin32|pywinpty)\b", r"not supported|only on Windows"),
        ),
        Actionability.DATASET_METADATA_ISSUE,
        "Remove Windows- or macOS-only dependencies, or guard them with environment "
        "markers (e.g. ; sys_platform == 'win32').",
        False,
    ),
    (
        FailureClass.MISSING_INSTALL_MECHANISM,
        _Any(
            r"Could not open requirements file",
            r"neither 'setup\.py' nor 'pyproject\.toml' found",
            r"does not appear to be a Python project",
            _Then(r"can't open file ", r"setup\.py"),
            _Then(r"No such file or directory: '", _quoted_install_file),
        ),
        Actionability.DATASET_METADATA_ISSUE,
        "The install commands name a file or project the repository does not have; point "
        "them at the repository's real install mechanism.",
        False,
    ),
    (
        FailureClass.APT_FAILURE,
        _Any(
            r"^E: ",
            _Then(r"apt-get (?:update|install)", r" returned a non-zero code"),
            _REPO_GONE,
            _KEYS_BAD,
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
        repo_gone=_REPO_GONE.find(log_text) is not None,
        keys_bad=_KEYS_BAD.find(log_text) is not None,
        headers_missing=_HEADERS_MISSING.find(log_text) is not None,
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
        found = pattern.find(log_text)
        if found is not None:
            return FailureInfo(
                failure_class=failure_class,
                actionability=actionability,
                remediation=remediation,
                retry_on_policy_change=retry,
                evidence=_line_of(log_text, found),
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
