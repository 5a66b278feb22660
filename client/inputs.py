"""Hostile input, refused at the door: strict JSON, bounded reads, checked paths.

Every byte a request brings (the request itself, the profile file it names, files a
repository holds that a worker reads) passes through here before anything else looks at
it. Each check raises a specific :class:`~pfbuild.client.errors.BadRequest`:

- :func:`loads_strict` decodes JSON that is UTF-8, holds no lone surrogate, no ``NaN`` or
  ``Infinity``, no duplicate key, no number longer than a limit, and no nesting deeper
  than a limit (the C decoder's recursion is bounded by the interpreter's, and caught);
- :func:`check_value` holds an already decoded value (a dict a Python caller passed, or
  what the broker decoded) to the same rules;
- :func:`read_bounded` reads at most a limit of bytes from a regular file, opened
  non-blocking (a FIFO cannot hang it) and, where asked, without following a symlink;
- :func:`check_path_text` and :func:`resolve_path` refuse NUL, over-long paths and
  symlink loops with a clean error rather than a crash.

Nothing here imports the worker package or the docker SDK.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pfbuild.client.errors import BadRequest, InvalidJson, LimitExceeded, UnsafePath
from pfbuild.client.settings import Settings

__all__ = [
    "JsonLimits",
    "check_path_text",
    "check_value",
    "loads_strict",
    "read_bounded",
    "resolve_path",
]

_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonLimits:
    """The limits :func:`loads_strict` and :func:`check_value` enforce.

    Built from ``Settings`` (``JsonLimits.of(settings)``) so that every side (CLI, client,
    worker) refuses the same things.
    """

    def __init__(self, *, max_bytes: int, max_depth: int, max_number_digits: int) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.max_number_digits = max_number_digits

    @classmethod
    def of(cls, settings: Settings) -> JsonLimits:
        return cls(
            max_bytes=settings.max_request_bytes,
            max_depth=settings.max_json_depth,
            max_number_digits=settings.max_number_digits,
        )


def _too_large(what: str, setting: str, limit: int, got: int | str) -> NoReturn:
    hint = f"; set PFBUILD_{setting.upper()} to change it" if setting else ""
    raise LimitExceeded(
        f"{what} is over the limit of {limit} ({got}){hint}",
        details={"setting": setting, "limit": limit},
    )


def loads_strict(data: str | bytes, *, what: str, limits: JsonLimits) -> Any:
    """Decode ``data`` as strict JSON, or raise a BadRequest that says what is wrong."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > limits.max_bytes:
        _too_large(what, "max_request_bytes", limits.max_bytes, f"{size} bytes")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJson(f"{what} is not valid UTF-8: {exc}") from None
    else:
        text = data
    if _SURROGATE.search(text):
        raise InvalidJson(f"{what} holds a lone surrogate, which is not valid Unicode")

    def number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
        def parse(literal: str) -> Any:
            if len(literal) > limits.max_number_digits:
                _too_large(
                    f"a number in {what}",
                    "max_number_digits",
                    limits.max_number_digits,
                    f"{len(literal)} characters",
                )
            value = kind(literal)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidJson(f"{what}: {literal[:40]} does not fit in a finite number")
            return value

        return parse

    def constant(name: str) -> NoReturn:
        raise InvalidJson(f"{what}: {name} is not JSON")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise InvalidJson(f"{what}: the key {key[:100]!r} appears twice in one object")
            result[key] = value
        return result

    try:
        value = json.loads(
            text,
            object_pairs_hook=no_duplicates,
            parse_constant=constant,
            parse_int=number(int),
            parse_float=number(float),
        )
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder's own recursion is bounded: deeper than that
        _too_large(f"{what}'s nesting", "max_json_depth", limits.max_depth, "far deeper")
    # the walk holds the value to the depth limit, and finds a lone surrogate that a
    # "\ud800" escape decoded to
    check_value(value, what=what, limits=limits)
    return value


def check_value(value: Any, *, what: str, limits: JsonLimits) -> None:
    """Hold a decoded value to the rules of :func:`loads_strict` (without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise InvalidJson(f"{what} holds a lone surrogate, which is not valid Unicode")
        elif isinstance(item, bool) or item is None:
            pass
        elif isinstance(item, int):
            digits = int(item.bit_length() * 0.30103) + 1  # log10(2): no str() of a huge int
            if digits > limits.max_number_digits + 1:
                _too_large(
                    f"a number in {what}",
                    "max_number_digits",
                    limits.max_number_digits,
                    f"about {digits} digits",
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidJson(f"{what} holds {item}, which is not JSON")
        elif isinstance(item, dict | list | tuple):
            if depth >= limits.max_depth:
                _too_large(f"{what}'s nesting", "max_json_depth", limits.max_depth, "deeper")
            if isinstance(item, dict):
                for key in item:
                    if not isinstance(key, str):
                        raise InvalidJson(f"{what}: object keys must be strings, got {key!r}")
                    stack.append((key, depth + 1))
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
        else:
            raise InvalidJson(f"{what} holds a {type(item).__name__}, which is not JSON")


def check_path_text(value: str, *, what: str, max_length: int) -> None:
    """Refuse a path that no file system could hold: NUL, too long, not valid Unicode."""
    if "\x00" in value:
        raise UnsafePath(f"{what} contains NUL")
    if len(value) > max_length:
        _too_large(what, "max_path_length", max_length, f"{len(value)} characters")
    if _SURROGATE.search(value):
        raise UnsafePath(f"{what} is not valid Unicode")


def resolve_path(value: str | Path, *, what: str, must_exist: bool) -> tuple[Path, bool]:
    """``(resolved path, exists)``, symlinks followed; loops and OS refusals are BadRequests."""
    try:
        path = Path(value).resolve(strict=must_exist)
        exists = path.exists()
    except FileNotFoundError:
        raise BadRequest(f"{what} {str(value)!r} does not exist") from None
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise UnsafePath(f"{what} {str(value)!r} is a symbolic link loop") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UnsafePath(f"{what} {str(value)!r} cannot be resolved: {reason}") from None
    if must_exist and not exists:
        raise BadRequest(f"{what} {str(value)!r} does not exist")
    return path, exists


def read_bounded(
    path: str | Path, *, what: str, limit: int, setting: str = "", follow_symlinks: bool = True
) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``, or a BadRequest.

    ``setting`` names the Settings field that holds ``limit``, if one does.
    Opened with ``O_NONBLOCK`` (so a FIFO cannot block the open) and, unless
    ``follow_symlinks``, ``O_NOFOLLOW``; anything but a regular file (a FIFO, a device
    such as ``/dev/zero``, a folder) is refused before a byte is read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BadRequest(f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UnsafePath(f"cannot open {what} {str(path)!r}: {reason}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise UnsafePath(f"{what} {str(path)!r} is {kind}")
        if info.st_size > limit:
            _too_large(what, setting, limit, f"{info.st_size} bytes")
        chunks: list[bytes] = []
        left = limit + 1  # one byte more tells a file that grew past the limit
        while left > 0:
            chunk = os.read(fd, min(left, 1024 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            _too_large(what, setting, limit, "growing")
        return data
    except OSError as exc:
        raise UnsafePath(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
