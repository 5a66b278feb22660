from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from pfbuild.client.models import Actionability, FailureClass
from pfbuild.worker.build.failures import classify, next_variant, read_symptoms, record_unsupported
from pfbuild.worker.build.render import VARIANTS, Variant

REPO_GONE = "E: The repository 'http://deb.debian.org/debian buster Release' does not have a Release file."
KEYS_BAD = "W: GPG error: http://archive.debian.org stretch Release: The following signatures were invalid: EXPKEYSIG"
HEADERS = "src/x.c:1:10: fatal error: Python.h: No such file or directory"


def _next(variant: str, log: str, py: str = "3.7", allow: bool = True) -> str | None:
    nxt = next_variant(VARIANTS[variant], read_symptoms(log), python_version=py,
                       allow_unauth=allow, unauth_max_python="3.8")
    return nxt.name if nxt else None


def test_ladder_climbs_one_rung_per_symptom() -> None:
    assert _next("standard", REPO_GONE) == "archive"
    assert _next("archive", KEYS_BAD) == "archive-unauth"
    assert _next("standard", HEADERS) == "builder"
    assert _next("archive-unauth", HEADERS) == "builder-archive-unauth"
    assert _next("builder", REPO_GONE) == "builder-archive"


def test_ladder_stops_when_nothing_new_applies() -> None:
    assert _next("standard", "ERROR: some unrelated failure") is None
    assert _next("builder", HEADERS) is None
    assert _next("archive", REPO_GONE) is None


def test_unauth_only_for_old_python_and_when_allowed() -> None:
    assert _next("archive", KEYS_BAD, py="3.8.10") == "archive-unauth"
    assert _next("archive", KEYS_BAD, py="3.9") is None
    assert _next("archive", KEYS_BAD, py="3.7", allow=False) is None


@pytest.mark.parametrize(
    ("log", "cls", "actionability"),
    [
        ("ERROR: Could not open requirements file: [Errno 2] No such file or directory: "
         "'requirements.txt'", FailureClass.MISSING_INSTALL_MECHANISM,
         Actionability.DATASET_METADATA_ISSUE),
        ("ERROR: Could not find a version that satisfies the requirement pkg-resources==0.0.0",
         FailureClass.INVALID_REQUIREMENT, Actionability.DATASET_METADATA_ISSUE),
        ("ERROR: No matching distribution found for pywin32==306",
         FailureClass.PLATFORM_INCOMPATIBLE_DEPENDENCY, Actionability.DATASET_METADATA_ISSUE),
        ("Step 2/6 : RUN apt-get update\n" + REPO_GONE, FailureClass.APT_FAILURE,
         Actionability.INFRA_ISSUE),
        ("Traceback ...\nSegmentation fault", FailureClass.BUILD_FAILURE,
         Actionability.INFRA_ISSUE),
    ],
)
def test_classify(log: str, cls: FailureClass, actionability: Actionability) -> None:
    info = classify(log)
    assert info.failure_class is cls and info.actionability is actionability
    assert info.remediation and info.evidence


def _record(path: str, n: int) -> None:
    info = classify("ERROR: No matching distribution found for pywin32")
    for _ in range(n):
        record_unsupported(Path(path), "prof", info, variant="standard")


def test_registry_counts_per_key_under_concurrency(tmp_path: Path) -> None:
    registry = tmp_path / "unsupported_registry.json"
    procs = [multiprocessing.Process(target=_record, args=(str(registry), 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    record_unsupported(registry, "other", classify("boom"), variant="builder")
    data = json.loads(registry.read_text())
    entry = data["entries"]["prof:platform_incompatible_dependency"]
    assert entry["count"] == 100
    assert entry["first_seen"] <= entry["last_seen"]
    assert data["entries"]["other:build_failure"]["count"] == 1


def test_variant_names_round_trip() -> None:
    for name, variant in VARIANTS.items():
        assert variant.name == name == Variant.named(name).name
