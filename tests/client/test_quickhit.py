"""The quick hit's own rules (client/quickhit.py): which commands it may answer, what its
memo is keyed on, what makes it distrust a memo, and its one Redis call. The whole path
on a real engine and a real farm: tests/integration/test_cli_hits.py, test_queue.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client import fingerprint, quickhit


@pytest.fixture(autouse=True)
def _no_racy_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree made by the test is trusted at once (its files' ctimes are now)."""
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["submit", "--wait"], "submit"),
        (["submit", "--json", "--wait"], "submit"),
        (["build"], "build"),
        (["submit"], None),  # no answer to print
        (["submit", "--wait", "--force"], None),
        (["submit", "--wait", "--repo-dir", "x"], None),
        (["build", "--help"], None),
        (["status", "x"], None),
        ([], None),
    ],
)
def test_only_a_request_on_stdin_that_waits_is_answered(argv: list[str],
                                                        command: str | None) -> None:
    assert quickhit._command(argv) == command


def _checkout(tmp_path: Path) -> tuple[Path, bytes]:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "code.py").write_text("print('hi')\n")
    (repo / "p.json").write_text(json.dumps({"install_cmds": ["true"]}))
    raw = json.dumps({"repo_dir": str(repo), "profile_path": str(repo / "p.json")}).encode()
    return repo, raw


def _answer(repo: Path) -> dict[str, Any]:
    manifest = repo / ".pf_manifest" / "image_build" / "pid" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    return {"cache_source": "local", "image_id": "sha256:abc", "image_tag": "t/pid:abc",
            "profile_id": "pid", "manifest_path": str(manifest), "manifest": {},
            "timings": {"total": 1.0}}


def _remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    monkeypatch.chdir(tmp_path)
    repo, raw = _checkout(tmp_path)
    fingerprint = quickhit.checkout_fingerprint(raw)
    assert fingerprint is not None
    quickhit.remember("submit", raw, fingerprint, _answer(repo), {"keys": []})
    assert quickhit._recall("submit", raw, dict(os.environ)) is not None
    return repo, raw


def test_a_memo_is_of_this_very_request_command_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, raw = _remembered(tmp_path, monkeypatch)
    env = dict(os.environ)
    # `pfbuild build` and the embedded `submit --wait` ask the same engine the same thing
    assert quickhit._recall("build", raw, env) is not None
    other = json.dumps({"repo_dir": str(repo), "profile_path": str(repo / "p.json"),
                        "image_cache_dir": str(tmp_path)}).encode()
    assert quickhit._recall("submit", other, env) is None  # another request
    assert quickhit._recall("submit", raw, {**env, "PFBUILD_HOST_ID": "x"}) is None
    assert quickhit._recall("submit", raw, {**env, "DOCKER_HOST": "tcp://x:1"}) is None
    # a farm's answer is not the embedded default's
    assert quickhit._recall("submit", raw, {**env, "PFBUILD_REDIS_URL": "redis://x"}) is None
    monkeypatch.chdir(repo)  # relative paths would mean other files
    assert quickhit._recall("submit", raw, env) is None


@pytest.mark.parametrize("change", ["edit", "new file", "profile", "profile touched",
                                    "manifest gone"])
def test_a_memo_is_not_trusted_once_the_checkout_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    repo, raw = _remembered(tmp_path, monkeypatch)
    old = time.time() - 30
    if change == "edit":
        (repo / "code.py").write_text("print('ho')\n")
    elif change == "new file":
        (repo / "more.py").write_text("")
    elif change == "profile":
        (repo / "p.json").write_text(json.dumps({"install_cmds": ["false"]}))
    elif change == "profile touched":
        os.utime(repo / "p.json", (old, old))  # same bytes, another stat
    else:
        (repo / ".pf_manifest" / "image_build" / "pid" / "manifest.json").unlink()
    assert quickhit._recall("submit", raw, dict(os.environ)) is None


def test_no_memo_of_a_racy_tree_a_miss_or_when_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    repo, raw = _checkout(tmp_path)
    with monkeypatch.context() as racy:
        racy.setattr(fingerprint, "RACY_SECONDS", 3600.0)
        assert quickhit.checkout_fingerprint(raw) is None  # changed within the racy seconds
    taken = quickhit.checkout_fingerprint(raw)
    built = {**_answer(repo), "cache_source": "built"}
    quickhit.remember("submit", raw, taken, built, {"keys": []})
    assert quickhit._recall("submit", raw, dict(os.environ)) is None  # only hits
    monkeypatch.setenv("PFBUILD_CLIENT_HITS", "false")
    quickhit.remember("submit", raw, taken, {**built, "cache_source": "local"},
                      {"keys": []})
    monkeypatch.delenv("PFBUILD_CLIENT_HITS")
    assert quickhit._recall("submit", raw, dict(os.environ)) is None
    forced = json.dumps({**json.loads(raw), "force_rebuild": True}).encode()
    assert quickhit.checkout_fingerprint(forced) is None


def test_one_redis_call_runs_the_script_on_the_selected_database(url: str) -> None:
    """The quick hit's own Redis protocol: a reply of each kind, SELECT, an error reply."""
    import redis

    client = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/3")
    client.set("k", "v")
    db3 = url.rsplit("/", 1)[0] + "/3"
    assert quickhit._redis_call(db3, "GET", "k") == b"v"
    assert quickhit._redis_call(url, "GET", "k") is None  # database 0
    assert quickhit._redis_call(db3, "EVAL", "return {1, 'x'}", "0") == [1, b"x"]
    assert quickhit._redis_call(db3, "PING") == b"PONG"
    with pytest.raises(quickhit._RedisError):
        quickhit._redis_call(db3, "NOSUCHCOMMAND")
    with pytest.raises(quickhit._RedisError):
        quickhit._redis_call("sentinel://127.0.0.1:1", "PING")  # left to redis-py


def test_the_held_script_answers_only_a_live_holder_of_that_image(url: str) -> None:
    """The script the quick hit and the library's known hits share: a live host whose
    engine answers and whose codes name that image id holds it, and the use is recorded."""
    import redis

    client = redis.Redis.from_url(url)
    keys = ["stats", "beat", "codes", "uses"]
    args = ["pid:code", "sha256:1", "pid", "100.0"]

    def held() -> Any:
        return quickhit._redis_call(url, "EVAL", quickhit.HELD_SCRIPT, "4", *keys, *args)

    assert held() == 0  # no heartbeat
    client.set("beat", json.dumps({"engine_ok": True}))
    assert held() == 0  # not among its codes
    client.hset("codes", "pid:code", "sha256:2")
    assert held() == 0  # another image under the code tag
    client.hset("codes", "pid:code", "sha256:1")
    assert held() == 1
    assert client.zscore("uses", "pid:code") == 100.0 and client.hget("stats", "source:local")
    client.set("beat", json.dumps({"engine_ok": False}))
    assert held() == 0  # its engine does not answer


def test_an_answer_with_a_publication_pending_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It would be repeated as pending after the publication ended."""
    monkeypatch.chdir(tmp_path)
    repo, raw = _checkout(tmp_path)
    answer = _answer(repo)
    answer["manifest"] = {"publications": {"tarball": {"state": "pending"}}}
    quickhit.remember("submit", raw, quickhit.checkout_fingerprint(raw), answer, {"keys": []})
    assert quickhit._recall("submit", raw, quickhit._environment()) is None
    answer["manifest"] = {"publications": {"tarball": {"state": "done"}}}
    quickhit.remember("submit", raw, quickhit.checkout_fingerprint(raw), answer, {"keys": []})
    assert quickhit._recall("submit", raw, quickhit._environment()) is not None


def test_a_link_in_the_checkout_s_output_folder_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout that ships `.pf_manifest/hits` as a link gets no memo written through it."""
    monkeypatch.chdir(tmp_path)
    repo, raw = _checkout(tmp_path)
    answer = _answer(repo)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / ".pf_manifest" / "hits").symlink_to(elsewhere)
    quickhit.remember("submit", raw, quickhit.checkout_fingerprint(raw), answer, {"keys": []})
    assert list(elsewhere.iterdir()) == []
    assert quickhit._recall("submit", raw, quickhit._environment()) is None


def test_settings_names_in_any_case_count(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings reads `pfbuild_client_hits` as `PFBUILD_CLIENT_HITS`: so does this."""
    _, raw = _remembered(tmp_path, monkeypatch)
    monkeypatch.setenv("pfbuild_allowed_roots", '["/nowhere"]')
    assert quickhit._recall("submit", raw, quickhit._environment()) is None  # another key
    monkeypatch.delenv("pfbuild_allowed_roots")
    monkeypatch.setenv("pfbuild_client_hits", "false")
    assert not quickhit._enabled(quickhit._environment())


def test_urls_it_does_not_speak_go_the_whole_way(url: str) -> None:
    for other in (url + "?db=3", url.replace("redis://", "rediss://"),
                  "unix:///nonexistent.sock?password=x"):
        with pytest.raises(quickhit._RedisError):
            quickhit._redis_call(other, "PING")
