from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client.profile import parse_profile
from pfbuild.worker.build.render import VARIANTS, escape_env_value, render

GOLDEN = Path(__file__).parent / "golden"
PROFILE: dict[str, Any] = {
    "python_version_target": "3.8.18",
    "install_cmds": ["pip install -r requirements.txt", "   ", "pip install -e ."],
    "env": {"ZED": "last", "ALPHA": 'a "quoted" $HOME \\ value', "MID": "with spaces"},
}


def _render(doc: dict[str, Any], variant: str) -> str:
    return render(
        parse_profile(doc),
        VARIANTS[variant],
        base_image=f"python:{parse_profile(doc).python_version}-slim",
        archive_url="http://archive.example.invalid",
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_golden_file(variant: str) -> None:
    text = _render(PROFILE, variant)
    golden = GOLDEN / f"{variant}.Dockerfile"
    if os.environ.get("PFBUILD_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_six_variants() -> None:
    assert sorted(VARIANTS) == sorted(
        ["standard", "builder", "archive", "archive-unauth", "builder-archive",
         "builder-archive-unauth"]
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_key_order_does_not_matter(variant: str) -> None:
    shuffled = {k: PROFILE[k] for k in reversed(list(PROFILE))}
    shuffled["env"] = dict(reversed(list(PROFILE["env"].items())))  # type: ignore[union-attr]
    assert _render(shuffled, variant) == _render(PROFILE, variant)


def test_structure_of_standard() -> None:
    lines = _render(PROFILE, "standard").splitlines()
    assert lines[0] == "FROM python:3.8.18-slim"
    assert lines[1].startswith("RUN apt-get update && apt-get install -y git build-essential curl")
    assert lines[2:4] == ["WORKDIR /workspace", "COPY . /workspace"]
    assert [ln.split("=")[0] for ln in lines[4:7]] == ["ENV ALPHA", "ENV MID", "ENV ZED"]
    assert lines[7:] == ["RUN pip install -r requirements.txt", "RUN pip install -e ."]


def test_builder_and_unauth_flags() -> None:
    assert "python3-dev libffi-dev" in _render(PROFILE, "builder")
    assert "python3-dev" not in _render(PROFILE, "archive")
    unauth = _render(PROFILE, "builder-archive-unauth")
    assert "--allow-unauthenticated" in unauth and "AllowInsecureRepositories" in unauth
    assert "--allow-unauthenticated" not in _render(PROFILE, "archive")
    assert "archive.example.invalid/debian" in _render(PROFILE, "archive")


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("plain", '"plain"'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("$HOME", '"\\$HOME"'),
        ("a\\b", '"a\\\\b"'),
        ("end\\", '"end\\\\"'),
        ("", '""'),
    ],
)
def test_env_escaping(value: str, quoted: str) -> None:
    assert escape_env_value(value) == quoted
