"""The stat fingerprint of a checkout: what tells, without reading a file, that a tree is
the one seen before (the client's known hits, ``client/hits.py``, and the worker's memo of
a tree's scan, ``worker/build/context.py``). Standard library only, so a worker's hit path
loads nothing of the queue for it."""

from __future__ import annotations

import hashlib
import os
import stat
import time

__all__ = ["RACY_SECONDS", "tree_fingerprint"]

# pfbuild's own output inside a repository (worker/layout.py: EXCLUDED_FROM_CONTEXT)
_OWN_OUTPUT = (".pf_manifest", ".tmp-test")
# an entry changed this recently may change again without its stat showing it
RACY_SECONDS = 2.0


def tree_fingerprint(root: str) -> str | None:
    """The stat fingerprint of the tree at ``root`` (every entry's name, mode, size, mtime,
    inode and ctime, as git's index keeps them, less pfbuild's own output); None when
    an entry changed within :data:`RACY_SECONDS` or the tree cannot be read."""
    now = time.time()
    digest = hashlib.sha256()
    pending = [""]
    try:
        while pending:
            folder = pending.pop()
            with os.scandir(os.path.join(root, folder)) as entries:
                found = sorted((e.name, e) for e in entries)
            for name, entry in found:
                if not folder and name in _OWN_OUTPUT:
                    continue
                path = f"{folder}/{name}" if folder else name
                st = entry.stat(follow_symlinks=False)
                if now - max(st.st_mtime, st.st_ctime) < RACY_SECONDS:
                    return None
                digest.update(
                    f"{path}\0{st.st_mode:o} {st.st_size} {st.st_mtime_ns} {st.st_ino} "
                    f"{st.st_ctime_ns}\n".encode("utf-8", "surrogateescape")
                )
                if stat.S_ISDIR(st.st_mode):
                    pending.append(path)
    except OSError:
        return None
    return digest.hexdigest()
