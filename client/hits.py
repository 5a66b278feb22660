"""Hits the farm already knows, answered by the client with no worker round trip.

A client remembers, per checkout (repository, profile, cache folder), the answer a worker
gave it and the *stat fingerprint* of the checkout taken just before it submitted: every
entry's name, mode, size, mtime, inode and ctime, as git's index keeps them, less
pfbuild's own output. The next submit of that checkout takes the fingerprint again;
when it is unchanged, the code is the code the worker digested, and the client asks Redis,
in one round trip (``quickhit.HELD_SCRIPT``), whether a live host whose engine answers holds that
code's image under its code tag, with the very image id it was answered. If so, that is
the answer (``cache_source: "local"``, the worker and host of that holder), and the use is
recorded for garbage collection as a worker would; if not, the request goes to the queue.

Why this is safe (docs/design.md, "What a hit means"):

- any change to the tree moves some entry's stat (an edit, a new or removed file, a
  rename); a fingerprint taken while an entry changed within the last seconds is not
  trusted (a write within the clock's tick would leave its stat alone), so nothing racy
  is remembered or answered;
- the fingerprint is taken *before* the submit: if the tree changed while the worker
  digested it, the next fingerprint differs from the remembered one and the worker is
  asked again;
- the fingerprint covers files ``.dockerignore`` leaves out too: editing one sends the
  request to a worker, which answers a hit; nothing wrong is answered;
- a host records its codes from its engine only, at each beat and at each of the
  engine's image events, and records none while it does not follow those events: an image
  removed, or a code tag moved to another image, is seen within milliseconds of the
  engine's event, as by a worker's own image watch (``worker/imagewatch.py``).

Nothing here imports the docker SDK or ``pfbuild.worker``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pfbuild.client.fingerprint import tree_fingerprint
from pfbuild.client.hosts import HostInfo, HostKeys, held_code
from pfbuild.client.models import BuildAnswer, Timings
from pfbuild.client.queue import Keys
from pfbuild.client.quickhit import HELD_SCRIPT

__all__ = ["KnownHits", "tree_fingerprint"]

_MAX_CHECKOUTS = 10_000




class KnownHits:
    """One client's memory of the answers its checkouts got (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, ...], tuple[str, BuildAnswer]] = {}

    def learn(self, key: tuple[str, ...], fingerprint: str, answer: BuildAnswer) -> None:
        """Remember ``answer`` for the checkout ``key`` as it was at ``fingerprint``."""
        if not answer.context_sha256 or not answer.image_id:
            return
        with self._lock:
            if len(self._known) >= _MAX_CHECKOUTS:
                self._known.clear()
            self._known[key] = (fingerprint, answer)

    def recall(self, key: tuple[str, ...], fingerprint: str) -> BuildAnswer | None:
        """The answer remembered for ``key`` if the checkout is as it was then."""
        with self._lock:
            known = self._known.get(key)
        if known is None or known[0] != fingerprint:
            return None
        return known[1]

    def answer(
        self, client: Any, known: BuildAnswer, hosts: list[HostInfo], started: float
    ) -> BuildAnswer | None:
        """``known`` again, if a live host among ``hosts`` holds its image under its code
        tag (one round trip, ``client`` a redis client); else None."""
        if not hosts or not os.path.isfile(known.manifest_path):
            return None
        code = known.image_tag.rpartition(":")[2]
        keys = [Keys.stats()]
        for host in hosts:
            keys += [
                HostKeys.heartbeat(host.host_id),
                HostKeys.codes(host.host_id),
                Keys.uses(host.host_id),
            ]
        member = held_code(known.profile_id, code)
        found = int(
            client.eval(HELD_SCRIPT, len(keys), *keys, member, known.image_id, known.profile_id,
                        time.time())
        )
        if not found:
            return None
        holder = hosts[found - 1].host_id
        spent = time.monotonic() - started
        worker = f"{holder}:client"
        return known.model_copy(
            update={
                "cache_source": "local",
                "reused_cache": True,
                "worker": worker,
                "docker_host": holder,
                "attempts": [],
                "timings": Timings(cache_check=spent, total=spent),
                "manifest": known.manifest.model_copy(
                    update={"cache_source": "local", "worker": worker, "docker_host": holder,
                            "attempts": [], "events": []}
                ),
            }
        )
