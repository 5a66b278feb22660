from __future__ import annotations

import gzip
import hashlib
import uuid
from pathlib import Path

import pytest

from pfbuild.client.errors import TarballRejected
from pfbuild.worker.caches import tarball
from pfbuild.worker.caches.trust import TrustStore
from pfbuild.worker.engine import BuildSpec
from tests.fakes import FakeEngine, dockerfile_context, image_tar

TAG = "patchfoundry/p1:latest"


def _saved(tmp_path: Path) -> tuple[FakeEngine, Path]:
    engine = FakeEngine()
    engine.blobs[TAG] = image_tar(TAG, b"layer" * 50_000)
    info = tarball.save_tarball(
        engine, TAG, tmp_path, "p1", level=3, threads=2, trust=_trust(tmp_path)
    )
    return engine, Path(info.path)


def _trust(tmp_path: Path) -> TrustStore:
    return TrustStore(tmp_path.parent / f"{tmp_path.name}-trust")


def test_save_is_zstd_with_checksum_sidecar_and_no_temp_left(tmp_path: Path) -> None:
    engine, path = _saved(tmp_path)
    assert path.name == "p1.tar.zst" and path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "p1.tar.zst.sha256").read_text().split()[0] == digest
    assert path.stat().st_size < len(engine.blobs[TAG]) / 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1.tar.zst", "p1.tar.zst.sha256"]


def test_load_round_trip_through_zstd(tmp_path: Path) -> None:
    engine, path = _saved(tmp_path)
    original = engine.blobs.pop(TAG)
    engine.images.clear()
    info, _ = tarball.load_tarball(engine, path, TAG, trust=_trust(tmp_path))
    assert engine.blobs[TAG] == original and info.compression == "zstd"


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_tarballs_other_tools_wrote_are_quarantined_unseen(tmp_path: Path, compression: str) -> None:
    blob = image_tar(TAG, b"x" * 1000)
    path = tmp_path / "p1.tar"
    path.write_bytes(gzip.compress(blob) if compression == "gzip" else blob)
    assert tarball.find_tarball(tmp_path, "p1") == path
    engine = FakeEngine()
    with pytest.raises(TarballRejected, match="did not save this tarball"):
        tarball.load_tarball(engine, path, TAG, trust=_trust(tmp_path))
    assert engine.loads == 0 and not path.exists()


def test_checksum_mismatch_quarantines_and_untags(tmp_path: Path) -> None:
    engine, path = _saved(tmp_path)
    (tmp_path / "p1.tar.zst.sha256").write_text("0" * 64 + "  p1.tar.zst\n")
    engine.images.clear()
    with pytest.raises(TarballRejected) as info:
        tarball.load_tarball(engine, path, TAG, trust=_trust(tmp_path))
    assert "sha256 mismatch" in info.value.message
    assert not path.exists() and info.value.moved_to and Path(info.value.moved_to).exists()
    assert engine.inspect(TAG) is None
    assert tarball.find_tarball(tmp_path, "p1") is None


def test_truncated_tarball_is_quarantined(tmp_path: Path) -> None:
    engine, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    (tmp_path / "p1.tar.zst.sha256").unlink()
    with pytest.raises(TarballRejected):
        tarball.load_tarball(engine, path, TAG, trust=_trust(tmp_path))
    assert not path.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1


def test_a_planted_zstd_tarball_never_reaches_the_engine(tmp_path: Path) -> None:
    """Another image's tag in a zstd tarball, with no sidecar or with a matching one."""
    import zstandard

    path = tmp_path / "p1.tar.zst"
    data = zstandard.ZstdCompressor().compress(image_tar("python:3.11-slim", b"x"))
    for sidecar in (False, True):
        path.write_bytes(data)
        if sidecar:
            digest = hashlib.sha256(data).hexdigest()
            (tmp_path / "p1.tar.zst.sha256").write_text(f"{digest}  p1.tar.zst\n")
        engine = FakeEngine()
        engine.images["python:3.11-slim"] = victim = engine.inspect(TAG) or _victim()
        with pytest.raises(TarballRejected, match="did not save this tarball"):
            tarball.load_tarball(engine, path, TAG, trust=_trust(tmp_path))
        assert engine.loads == 0 and engine.images["python:3.11-slim"] is victim
        assert not path.exists()


def _victim():  # type: ignore[no-untyped-def]
    from pfbuild.worker.engine import ImageInfo

    return ImageInfo(id="sha256:" + "1" * 64, labels={})


def test_a_trusted_tarball_for_another_tag_is_refused(tmp_path: Path) -> None:
    engine, path = _saved(tmp_path)  # pfbuild saved it, but for TAG
    engine.images.clear()
    with pytest.raises(TarballRejected, match="did not save"):
        tarball.load_tarball(engine, path, "patchfoundry/p2:latest", trust=_trust(tmp_path))
    assert engine.loads == 0


@pytest.mark.parametrize("kind", ["symlink", "fifo", "devzero"])
def test_a_tarball_or_sidecar_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    import os

    engine, path = _saved(tmp_path)
    side = tmp_path / "p1.tar.zst.sha256"
    side.unlink()
    if kind == "symlink":  # the tarball itself is a link to a trusted one elsewhere
        real = tmp_path / "elsewhere.tar.zst"
        path.rename(real)
        path.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(side)
    else:
        side.symlink_to("/dev/zero")
    engine.images.clear()
    with pytest.raises(TarballRejected):
        tarball.load_tarball(engine, path, TAG, trust=_trust(tmp_path))
    assert engine.loads == 0 and not path.exists() and not side.exists()


def test_a_tarball_that_loads_other_tags_removes_only_its_own(tmp_path: Path) -> None:
    engine, path = _saved(tmp_path)
    engine.images.clear()
    load = engine.load

    def load_and_retag(data):  # type: ignore[no-untyped-def]
        names = load(data)
        engine.images["python:3.11-slim"] = _victim()
        return [*names, "Loaded image: python:3.11-slim"]

    engine.load = load_and_retag  # type: ignore[method-assign]
    with pytest.raises(TarballRejected, match="carries other images"):
        tarball.load_tarball(engine, path, TAG, trust=_trust(tmp_path))
    assert engine.inspect(TAG) is None and engine.inspect("python:3.11-slim") is not None


@pytest.mark.docker
def test_real_engine_cold_round_trip(docker_engine, tmp_path: Path, cleanup_images) -> None:  # type: ignore[no-untyped-def]
    """Save and reload an image whose top layer no other tag holds: a real load."""

    tag = f"pftest/cold-{uuid.uuid4().hex[:10]}:latest"
    cleanup_images.append(tag)
    dockerfile = f"FROM python:3.11-slim\nRUN head -c 8000000 /dev/urandom > /blob && echo {tag}\n"
    buf = dockerfile_context(dockerfile)
    lines: list[str] = []
    out = docker_engine.build(buf, BuildSpec(tag=tag, dockerfile="Dockerfile"), lines.append)
    assert out.ok, lines[-5:]
    trust = _trust(tmp_path)
    saved = tarball.save_tarball(
        docker_engine, tag, tmp_path, "cold", level=3, threads=2, trust=trust
    )
    docker_engine.remove(tag)
    assert docker_engine.inspect(tag) is None
    assert out.image is not None
    image_id = out.image.id
    loaded, _ = tarball.load_tarball(docker_engine, Path(saved.path), tag, trust=trust)
    again = docker_engine.inspect(tag)
    assert again is not None and again.id == image_id
    assert loaded.sha256 == saved.sha256

    # the same image as another tool would leave it, a plain `docker save` tar, is not
    # trusted: quarantined unseen, and the image in the engine is left alone
    plain = tmp_path / "other" / "cold.tar"
    plain.parent.mkdir()
    with open(plain, "wb") as fh:
        for chunk in docker_engine.save(tag):
            fh.write(chunk)
    assert tarball.find_tarball(plain.parent, "cold") == plain
    with pytest.raises(TarballRejected, match="did not save"):
        tarball.load_tarball(docker_engine, plain, tag, trust=trust)
    assert docker_engine.inspect(tag).id == image_id
