"""Hits the command line answers before it loads itself: ``pfbuild submit --wait`` (with or
without ``PFBUILD_REDIS_URL``) and ``pfbuild build``, on a request this checkout was
answered a hit for before.

An agent that shells out pays the command's start-up on every call; for a hit that is
most of the call (typer, pydantic and the settings, the docker SDK, Celery). So when such
a command answers a **hit** (``cache_source: "local"``), it remembers, in the checkout's
own output folder (``{repo_dir}/.pf_manifest/hits/{key}.json``):

- the key: the command, the request's exact bytes, the working directory and the
  environment pfbuild reads (``PFBUILD_*``, ``PF_*``, ``DOCKER_*``, ``HOME``), hashed;
- the checkout's stat fingerprint taken *before* the command's own hit check
  (``client/fingerprint.py``), the profile file's bytes (hashed) and stat;
- the answer, and how to check that its image is still held: on the local engine, its
  code tag still names its image id (one API call, through the docker SDK) and this
  host's publication record of the profile has not changed; on a farm, the answering host
  is alive, its engine answers and it still holds the code tag at that image id (the
  client-side hit's own Lua script, one round trip).

The next identical command takes the fingerprint again, and when the profile and the tree
are unchanged and the check passes, prints the remembered answer as a new hit (this
call's timings and worker). Anything else, any doubt or error, goes the whole way: the
full command runs as before, with the stdin bytes read here. The rules of a hit are those
of ``client/hits.py`` (docs/design.md, "What a hit means"); ``PFBUILD_CLIENT_HITS=false``
turns this off too.

Standard library only, but for the docker SDK on the engine's check: what this module
imports is what a quick hit costs. On a farm it speaks the Redis protocol itself for its one
call, for the same reason (redis-py's import alone costs twice the interpreter's start-up);
a URL it does not handle (TLS, Sentinel) goes the whole way, through redis-py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from typing import Any

from pfbuild.client.fingerprint import tree_fingerprint

__all__ = ["HELD_SCRIPT", "checkout_fingerprint", "file_stat", "quick_main", "remember",
           "take_stdin"]

_FORMAT = 1
_MEMO_DIR = (".pf_manifest", "hits")
_MAX_REQUEST = 64 * 1024  # a larger request goes the whole way
_MAX_MEMO = 1024 * 1024
_ENV_PREFIXES = ("PFBUILD_", "PF_", "DOCKER_")
_TIMEOUT = 2.0  # seconds the check may take; then the whole way

# Whether a live host whose engine answers holds the code tag naming the image id, and if
# so record the use as a worker's answer would (garbage collection orders by it).
# KEYS: stats, then per candidate host: heartbeat, codes, uses.
# ARGV: "{profile_id}:{code}", image id, profile id, now. Returns the holder's index.
HELD_SCRIPT = """
for i = 2, #KEYS, 3 do
  local beat = redis.call('get', KEYS[i])
  if beat and redis.call('hget', KEYS[i + 1], ARGV[1]) == ARGV[2] then
    local ok, info = pcall(cjson.decode, beat)
    if ok and type(info) == 'table' and info['engine_ok'] ~= false then
      redis.call('zadd', KEYS[i + 2], ARGV[4], ARGV[3], ARGV[4], ARGV[1])
      redis.call('hincrby', KEYS[1], 'source:local', 1)
      return (i - 2) / 3 + 1
    end
  end
end
return 0
"""

# the stdin bytes read here, for the full command when this one did not answer
_stdin: bytes | None = None


def take_stdin() -> bytes | None:
    """What :func:`quick_main` read of stdin (once), or None if it read nothing."""
    global _stdin
    taken, _stdin = _stdin, None
    return taken


def _command(argv: list[str]) -> str | None:
    """``submit`` or ``build`` when ``argv`` is a command this module may answer."""
    if argv and argv[0] == "build" and len(argv) == 1:
        return "build"
    if argv and argv[0] == "submit" and "--wait" in argv and all(
        a in ("--wait", "--json") for a in argv[1:]
    ):
        return "submit"
    return None


def _environment() -> dict[str, str]:
    """The environment pfbuild reads, its names upper-cased: pydantic-settings reads
    ``PFBUILD_*`` names in any case."""
    return {name.upper(): value for name, value in os.environ.items()
            if name.upper().startswith(_ENV_PREFIXES) or name.upper() == "HOME"}


def _mode(command: str, env: dict[str, str]) -> str:
    if command == "submit" and env.get("PFBUILD_REDIS_URL"):
        return "farm"
    return "engine"


def _enabled(env: dict[str, str]) -> bool:
    value = env.get("PFBUILD_CLIENT_HITS")
    return value is None or value.strip().lower() in ("1", "true", "yes", "on", "t", "y")


def _key(mode: str, raw: bytes, cwd: str, env: dict[str, str]) -> str:
    """The memo's name: the mode, this host, the working directory, the environment
    pfbuild reads (``env``, from :func:`_environment`) and the request's bytes."""
    host = socket.gethostname()
    digest = hashlib.sha256(
        f"{_FORMAT}\0{mode}\0{host}\0{cwd}\0".encode("utf-8", "surrogateescape")
    )
    for name in sorted(env):
        if name.startswith(_ENV_PREFIXES) or name == "HOME":
            digest.update(f"{name}={env[name]}\0".encode("utf-8", "surrogateescape"))
    digest.update(b"\0" + raw)
    return digest.hexdigest()


def _memo_path(repo_dir: str, key: str) -> str:
    return os.path.join(repo_dir, *_MEMO_DIR, f"{key}.json")


def file_stat(path: str) -> list[int] | None:
    """What tells that a file is the one seen before (None: there is none)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read(_MAX_MEMO + 1)).hexdigest()
    except OSError:
        return None


def _paths(raw: bytes, cwd: str) -> tuple[str, str] | None:
    """The request's repository and profile file, as absolute paths (None: not a request
    of the form this module remembers)."""
    try:
        request = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    repo, profile = request.get("repo_dir"), request.get("profile_path")
    if not isinstance(repo, str) or not isinstance(profile, str) or request.get("force_rebuild"):
        return None
    return os.path.join(cwd, repo), os.path.join(cwd, profile)


def _pending(answer: dict[str, Any]) -> bool:
    """Whether the answer says a publication is pending: it would be repeated as such."""
    manifest = answer.get("manifest")
    publications = manifest.get("publications") if isinstance(manifest, dict) else None
    return isinstance(publications, dict) and any(
        isinstance(p, dict) and p.get("state") == "pending" for p in publications.values()
    )


def checkout_fingerprint(raw: bytes) -> str | None:
    """The stat fingerprint of the checkout the request ``raw`` names (None: none to
    trust); taken before a command's hit check, for :func:`remember`."""
    paths = _paths(raw, os.getcwd())
    return tree_fingerprint(paths[0]) if paths is not None else None


def remember(
    command: str,
    raw: bytes,
    fingerprint: str | None,
    answer: dict[str, Any],
    check: dict[str, Any],
) -> None:
    """Remember ``answer``, a hit, for the next identical command (see the module's
    docstring). ``fingerprint`` is the checkout's, taken before its hit check; ``check`` how
    to tell the image is still held: ``{"engine": base_url, "api_version": ..., "record":
    path, "record_stat": its file_stat taken before it was read, "worker": prefix}`` or
    ``{"keys": [...], "member": ..., "host": host_id}``. Best effort: a memo that
    cannot be written is not remembered."""
    if fingerprint is None or answer.get("cache_source") != "local" or _pending(answer):
        return
    env = _environment()
    if not _enabled(env):
        return
    cwd = os.getcwd()
    paths = _paths(raw, cwd)
    if paths is None:
        return
    repo, profile = paths
    memo = {
        "format": _FORMAT,
        "fingerprint": fingerprint,
        "profile_sha256": _file_sha256(profile),
        "profile_stat": file_stat(profile),
        "repo_stat": file_stat(repo),
        "answer": answer,
        "check": check,
    }
    path = _memo_path(repo, _key(_mode(command, env), raw, cwd, env))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        if not _own_folder(repo):
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(memo, fh)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _own_folder(repo: str) -> bool:
    """Make ``{repo}/.pf_manifest/hits`` if need be; whether it and its parent are
    folders of their own (a link shipped in a checkout could point anywhere)."""
    folder = repo
    for name in _MEMO_DIR:
        folder = os.path.join(folder, name)
        if not os.path.lexists(folder):
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
        if os.path.islink(folder) or not os.path.isdir(folder):
            return False
    return True


def _recall(command: str, raw: bytes, env: dict[str, str]) -> dict[str, Any] | None:
    """The memo of this very command, if the checkout and its profile are unchanged."""
    cwd = os.getcwd()
    paths = _paths(raw, cwd)
    if paths is None:
        return None
    repo, profile = paths
    try:
        fd = os.open(_memo_path(repo, _key(_mode(command, env), raw, cwd, env)),
                     os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            memo = json.loads(fh.read(_MAX_MEMO))
    except (OSError, ValueError):
        return None
    if not isinstance(memo, dict) or memo.get("format") != _FORMAT:
        return None
    if memo.get("repo_stat") != file_stat(repo) or memo.get("profile_stat") != file_stat(profile):
        return None
    if memo.get("profile_sha256") != _file_sha256(profile):
        return None
    fingerprint = tree_fingerprint(repo)
    if fingerprint is None or fingerprint != memo.get("fingerprint"):
        return None
    answer = memo.get("answer")
    if not isinstance(answer, dict) or not os.path.isfile(str(answer.get("manifest_path"))):
        return None
    return memo


def _engine_holds(memo: dict[str, Any]) -> bool:
    """The engine's code tag still names the answer's image, and this host's publication
    record of the profile is the one seen then (a new one may say ``pending``)."""
    check, answer = memo["check"], memo["answer"]
    if file_stat(check["record"]) != check.get("record_stat"):
        return False
    import docker  # the one import beyond the standard library

    api = docker.APIClient(
        base_url=check["engine"], version=check["api_version"], timeout=_TIMEOUT
    )
    try:
        return bool(api.inspect_image(answer["image_tag"])["Id"] == answer["image_id"])
    finally:
        api.close()


class _RedisError(Exception):
    pass


def _encode(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _reply(stream: Any) -> Any:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"-":
        raise _RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"+":
        return rest
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2]
    if kind == b"*":
        return [_reply(stream) for _ in range(max(0, int(rest)))]
    raise OSError(f"unexpected reply from Redis: {line[:40]!r}")


def _redis_call(url: str, *args: str) -> Any:
    """One command on the Redis at ``url`` (``redis://`` or ``unix://`` only); its reply."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(url)
    if parts.scheme == "redis" and not parts.query:  # ?db=, ?password=: redis-py's
        sock = socket.create_connection((parts.hostname or "localhost", parts.port or 6379),
                                        timeout=_TIMEOUT)
        db = (parts.path or "/0").strip("/") or "0"
    elif parts.scheme == "unix" and not set(parse_qs(parts.query)) - {"db"}:
        db = parse_qs(parts.query).get("db", ["0"])[0]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_TIMEOUT)
        sock.connect(parts.path)
    else:
        raise _RedisError(f"not handled here: {parts.scheme}:{parts.query}")
    with sock, sock.makefile("rb") as stream:
        commands = []
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            auth = (user, unquote(parts.password)) if user else (unquote(parts.password),)
            commands.append(_encode("AUTH", *auth))
        if db != "0":
            commands.append(_encode("SELECT", db))
        commands.append(_encode(*args))
        sock.sendall(b"".join(commands))
        for _ in commands[:-1]:
            _reply(stream)
        return _reply(stream)


def _farm_holds(memo: dict[str, Any], url: str) -> str | None:
    """The host that answered, if it is alive, its engine answers and it still holds the
    code tag at the answer's image id (and the use is recorded, as by a worker)."""
    check, answer = memo["check"], memo["answer"]
    keys = [str(k) for k in check["keys"]]
    found = _redis_call(
        url, "EVAL", HELD_SCRIPT, str(len(keys)), *keys, str(check["member"]),
        str(answer["image_id"]), str(answer["profile_id"]), repr(time.time()),
    )
    return str(check["host"]) if found == 1 else None


def _as_hit(answer: dict[str, Any], worker: str, docker_host: str, spent: float) -> None:
    """``answer`` (a remembered hit) as this call's: its worker and timings."""
    timings = dict.fromkeys(answer.get("timings") or {}, 0.0)
    timings.update(cache_check=spent, total=spent)
    answer.update(cache_source="local", reused_cache=True, worker=worker,
                  docker_host=docker_host, attempts=[], timings=timings)
    manifest = answer["manifest"]
    manifest.update(cache_source="local", worker=worker, docker_host=docker_host,
                    attempts=[], events=[])


def quick_main(argv: list[str]) -> int | None:
    """Answer ``argv`` (the arguments after ``pfbuild``) here if it is a remembered hit
    still held: print the answer and return 0. Else None: the full command runs, and
    :func:`take_stdin` gives it what was read of stdin."""
    global _stdin
    started = time.monotonic()
    command = _command(argv)
    env = _environment()
    if command is None or not _enabled(env) or sys.stdin is None or sys.stdin.isatty():
        return None
    try:
        raw = sys.stdin.buffer.read(_MAX_REQUEST + 1)
    except (OSError, ValueError):  # the full command reads it again, and says why it fails
        return None
    _stdin = raw
    if len(raw) > _MAX_REQUEST:
        return None
    try:
        memo = _recall(command, raw, env)
        if memo is None:
            return None
        answer = memo["answer"]
        if _mode(command, env) == "farm":
            holder = _farm_holds(memo, env["PFBUILD_REDIS_URL"])
            if holder is None:
                return None
            worker = f"{holder}:client"
        else:
            if not _engine_holds(memo):
                return None
            holder = str(answer["docker_host"])
            worker = f"{memo['check']['worker']}:{os.getpid()}"
        _as_hit(answer, worker, holder, time.monotonic() - started)
    except Exception:  # any doubt: the whole way, which reports errors as they should be
        return None
    try:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
        sys.stdout.flush()
    except OSError:  # nobody reads the answer (a closed pipe): no traceback for it
        return 1
    return 0
