"""What the tarball cache trusts: only tarballs pfbuild saved itself, for that very tag.

A tarball is a list of instructions to the engine (``docker load`` tags whatever its
manifest names, and a gzip or plain tar can name any image, ``python:3.11-slim``
included), and the cache folder may be one a repository can write (the default
``{repo_dir}/.tmp-test/image-cache``) or shared storage. So the digest of every tarball
pfbuild saves is recorded, with the one tag it holds, in a worker-side folder
(``Settings.trust_dir()``) that no request names and no repository can write. A tarball
whose sha256 is not recorded there for exactly the profile's tag is quarantined before
the engine sees a byte of it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from pfbuild.client.errors import BadRequest
from pfbuild.client.inputs import JsonLimits, loads_strict, read_bounded
from pfbuild.worker.artifacts import atomic_write_text

__all__ = ["TrustStore"]

_DIGEST = re.compile(r"[0-9a-f]{64}")
_RECORD_MAX_BYTES = 4096
_RECORD_JSON = JsonLimits(max_bytes=_RECORD_MAX_BYTES, max_depth=4, max_number_digits=40)


class TrustStore:
    """One small JSON record per saved tarball, named by its sha256."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _record(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.folder / f"{digest}.json"

    def record(self, digest: str, tag: str, *, size: int) -> None:
        """Remember that pfbuild wrote the tarball with this ``digest``, holding ``tag``."""
        saved_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"sha256": digest, "tag": tag, "size": size, "saved_at": saved_at}
        atomic_write_text(self._record(digest), json.dumps(body, sort_keys=True) + "\n")

    def tag_of(self, digest: str) -> str | None:
        """The tag pfbuild saved in the tarball with this ``digest``; None if it did not."""
        try:
            raw = read_bounded(
                self._record(digest),
                what="trust record",
                limit=_RECORD_MAX_BYTES,
                follow_symlinks=False,
            )
            body = loads_strict(raw, what="trust record", limits=_RECORD_JSON)
        except (BadRequest, ValueError):
            return None
        if not isinstance(body, dict) or body.get("sha256") != digest:
            return None
        tag = body.get("tag")
        return tag if isinstance(tag, str) else None
