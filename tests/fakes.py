"""A fake Docker engine behind the Engine protocol, for unit tests and fault injection;
``run_request``, the pipeline from an unresolved request; ``eager_worker``, the task."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pfbuild.client.errors import EngineUnavailable, ImageLoadFailed
from pfbuild.client.models import BuildAnswer, BuildRequest
from pfbuild.client.profile import validate_request
from pfbuild.client.settings import Settings
from pfbuild.worker.build.resolve import resolve_request
from pfbuild.worker.engine import (
    BuildOutcome,
    BuildSpec,
    Engine,
    ImageInfo,
    RegistryFailed,
    Transfer,
)
from pfbuild.worker.pipeline import run_build


def image_tar(tag: str, payload: bytes, labels: dict[str, str] | None = None) -> bytes:
    """A tiny stand-in for `docker save` output: a tar naming the tag, its labels, data."""
    buf = io.BytesIO()
    members = (("repositories", tag.encode()), ("labels.json", json.dumps(labels or {}).encode()),
               ("layer.bin", payload))
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def dockerfile_context(dockerfile: str) -> io.BytesIO:
    """A build context holding nothing but ``Dockerfile``, ready to read."""
    data = dockerfile.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def nonce_profile(repo: Path, *cmds: str) -> dict[str, Any]:
    """``repo``'s profile made new (a nonce nobody has built), with ``cmds`` if given."""
    doc = json.loads((repo / "repo_profile.json").read_text())
    doc["env"]["PFTEST_NONCE"] = uuid.uuid4().hex
    if cmds:
        doc["install_cmds"] = list(cmds)
    return doc  # type: ignore[no-any-return]


def drop_image(engine: Engine, image_tag: str) -> None:
    """Take an answer's image out of ``engine`` (as on a host that never held it): its
    code tag and its profile's ``:latest``."""
    engine.remove(image_tag)
    engine.remove(image_tag.rpartition(":")[0] + ":latest")


def run_request(request: BuildRequest, settings: Settings, engine: Engine,
                **kw: object) -> BuildAnswer:
    """Resolve ``request`` and run the pipeline on it, as ``pfbuild build`` does."""
    request = validate_request(request, settings)  # as every door does on entry
    return run_build(resolve_request(request, settings), settings, engine, **kw)  # type: ignore[arg-type]


def eager_worker(
    settings: Settings, url: str, engine: Engine | Callable[[], Engine]
) -> tuple[Any, Any]:
    """A worker's Celery app and its build task, with ``engine`` (or what makes it), to
    ``apply()`` jobs in this process: a worker's result store and settings (results stored
    as a worker stores them, waking waiters and ending flights), without its signals or
    threads."""
    from pfbuild.client.queue import make_celery
    from pfbuild.worker.celery_app import configure_worker
    from pfbuild.worker.farm.results import ResultStore
    from pfbuild.worker.farm.tasks import register

    app = make_celery(settings, url, backend=ResultStore)
    configure_worker(app, settings)
    app.conf.task_store_eager_result = True
    factory = engine if callable(engine) else (lambda: engine)
    return app, register(app, settings, engine_factory=factory)


class FakeRegistry:
    """A registry several fake engines share: reference -> (image, blob, digest)."""

    def __init__(self) -> None:
        self.images: dict[str, tuple[ImageInfo, bytes, str]] = {}
        self.pushes = 0
        self.pulls = 0
        self.down = False


class FakeEngine:
    host = "fake://engine"

    def __init__(self, registry: FakeRegistry | None = None) -> None:
        self.registry = registry or FakeRegistry()
        self.images: dict[str, ImageInfo] = {}
        self.blobs: dict[str, bytes] = {}
        self.builds: list[dict[str, object]] = []
        self.loads = 0
        self.saves = 0
        self.save_error: BaseException | None = None  # what a save raises (a full disk)
        self.build_log: Callable[[str], list[str]] = lambda dockerfile: ["Step 1/1 : FROM x"]
        self.build_ok: Callable[[str], bool] = lambda dockerfile: True
        self.refuse_loads = False
        self.down = False  # an engine that does not answer

    def ping(self, timeout: float | None = None) -> bool:
        return not self.down

    def inspect(self, tag: str) -> ImageInfo | None:
        if self.down:
            raise EngineUnavailable(f"Docker engine at {self.host} stopped answering")
        return self.images.get(tag)

    def build(self, context: IO[bytes], spec: BuildSpec,
              on_line: Callable[[str], None]) -> BuildOutcome:
        tag, dockerfile, labels = spec.tag, spec.dockerfile, spec.labels
        with tarfile.open(fileobj=context, mode="r|") as tar:
            members = {}
            for m in tar:
                f = tar.extractfile(m)
                members[m.name] = f.read() if f else b""
        text = members[dockerfile].decode()
        # what COPY would see: every file but the Dockerfile, by name and content
        sources = hashlib.sha256(b"".join(
            name.encode() + b"\0" + hashlib.sha256(data).digest()
            for name, data in sorted(members.items()) if name != dockerfile)).hexdigest()
        self.builds.append({"tag": tag, "dockerfile": text, "nocache": spec.nocache,
                            "idle_timeout": spec.idle_timeout,
                            "cache_from": spec.cache_from, "members": sorted(members),
                            "sources": sources})
        for line in self.build_log(text):
            on_line(line)
        if not self.build_ok(text):
            return BuildOutcome(image=None, error="The command returned 1")
        # another Dockerfile or other code: another image, as on a real engine
        image_id = "sha256:" + hashlib.sha256(text.encode() + sources.encode()).hexdigest()
        self.images[tag] = ImageInfo(id=image_id, labels=dict(labels))
        self.blobs[tag] = image_tar(tag, text.encode() * 1000, dict(labels))
        return BuildOutcome(image=self.images[tag], error=None)

    def save(self, tag: str) -> Iterator[bytes]:
        self.saves += 1
        if self.save_error is not None:
            raise self.save_error
        data = self.blobs[tag]
        for i in range(0, len(data), 7000):
            yield data[i : i + 7000]

    def load(self, data: Iterable[bytes] | IO[bytes]) -> list[str]:
        self.loads += 1
        chunks = data if not hasattr(data, "read") else iter(lambda: data.read(65536), b"")  # type: ignore[union-attr]
        blob = b"".join(chunks)  # type: ignore[arg-type]
        if self.refuse_loads:
            raise ImageLoadFailed("invalid tar header")
        try:
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                member = tar.extractfile("repositories")
                tag = member.read().decode() if member else ""
                try:
                    found = tar.extractfile("labels.json")
                    labels = json.loads(found.read()) if found else {}
                except KeyError:
                    labels = {}
        except tarfile.TarError as exc:
            raise ImageLoadFailed(f"invalid tar: {exc}") from None
        self.images[tag] = ImageInfo(id="sha256:" + hashlib.sha256(blob).hexdigest(),
                                     labels=labels)
        self.blobs[tag] = blob
        return [f"Loaded image: {tag}"]

    def remove(self, tag: str) -> None:
        self.images.pop(tag, None)
        self.blobs.pop(tag, None)

    def tag(self, source: str, target: str) -> None:
        if source not in self.images:  # an image id, as the engine takes one
            source = next(t for t, i in self.images.items() if i.id == source)
        self.images[target] = self.images[source]
        self.blobs[target] = self.blobs[source]

    def push(self, ref: str) -> Transfer:
        if self.registry.down:
            raise RegistryFailed("connection refused")
        self.registry.pushes += 1
        digest = "sha256:" + hashlib.sha256(self.blobs[ref]).hexdigest()
        self.registry.images[ref] = (self.images[ref], self.blobs[ref], digest)
        return Transfer(digest, len(self.blobs[ref]))

    def pull(self, ref: str) -> Transfer | None:
        if self.registry.down:
            raise RegistryFailed("connection refused")
        if ref not in self.registry.images:
            return None
        self.registry.pulls += 1
        self.images[ref], self.blobs[ref], digest = self.registry.images[ref]
        return Transfer(digest, len(self.blobs[ref]))

    def tags(self, repository: str) -> list[str]:
        if self.down:
            raise EngineUnavailable(f"Docker engine at {self.host} stopped answering")
        return sorted(self.tagged(repository))

    def tagged(self, repository: str) -> dict[str, str]:
        if self.down:
            raise EngineUnavailable(f"Docker engine at {self.host} stopped answering")
        return {t: i.id for t, i in self.images.items() if t.startswith(repository + "/")}
