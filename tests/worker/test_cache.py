from __future__ import annotations

import gzip
import hashlib
import uuid
from pathlib import Path

import pytest

from pfbuild.client.errors import TarballRejected
from pfbuild.worker import cache
from tests.fakes import FakeEngine, image_tar

TAG = "patchfoundry/p1:latest"


def _saved(tmp_path: Path) -> tuple[FakeEngine, Path]:
    engine = FakeEngine()
    engine.blobs[TAG] = image_tar(TAG, b"layer" * 50_000)
    info = cache.save_tarball(engine, TAG, tmp_path, "p1", level=3, threads=2)
    return engine, Path(info.path)


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
    info, _ = cache.load_tarball(engine, path, TAG)
    assert engine.blobs[TAG] == original and info.compression == "zstd"


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_reads_tarballs_other_tools_wrote(tmp_path: Path, compression: str) -> None:
    blob = image_tar(TAG, b"x" * 1000)
    path = tmp_path / "p1.tar"
    path.write_bytes(gzip.compress(blob) if compression == "gzip" else blob)
    assert cache.find_tarball(tmp_path, "p1") == path
    engine = FakeEngine()
    info, _ = cache.load_tarball(engine, path, TAG)
    assert info.compression == compression and engine.inspect(TAG) is not None


def test_checksum_mismatch_quarantines_and_untags(tmp_path: Path) -> None:
    engine, path = _saved(tmp_path)
    (tmp_path / "p1.tar.zst.sha256").write_text("0" * 64 + "  p1.tar.zst\n")
    engine.images.clear()
    with pytest.raises(TarballRejected) as info:
        cache.load_tarball(engine, path, TAG)
    assert "sha256 mismatch" in info.value.message
    assert not path.exists() and info.value.moved_to and Path(info.value.moved_to).exists()
    assert engine.inspect(TAG) is None
    assert cache.find_tarball(tmp_path, "p1") is None


def test_truncated_tarball_is_quarantined(tmp_path: Path) -> None:
    engine, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    (tmp_path / "p1.tar.zst.sha256").unlink()
    with pytest.raises(TarballRejected):
        cache.load_tarball(engine, path, TAG)
    assert not path.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1


def test_wrong_tag_inside_is_rejected_and_untagged(tmp_path: Path) -> None:
    path = tmp_path / "p1.zst"
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(image_tar("python:3.11-slim", b"x")))
    engine = FakeEngine()
    with pytest.raises(TarballRejected, match="carries other images"):
        cache.load_tarball(engine, path, TAG)
    assert engine.inspect("python:3.11-slim") is None  # what it tagged is not trusted


def test_plain_tar_retagging_other_images_is_refused_before_loading(tmp_path: Path) -> None:
    import io
    import json
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = json.dumps([{"RepoTags": [TAG, "python:3.11-slim"], "Layers": []}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "p1.tar"
    path.write_bytes(buf.getvalue())
    engine = FakeEngine()
    with pytest.raises(TarballRejected, match="would tag other images: python"):
        cache.load_tarball(engine, path, TAG)
    assert engine.loads == 0 and not path.exists()


@pytest.mark.docker
def test_real_engine_cold_round_trip(docker_engine, tmp_path: Path, cleanup_images) -> None:  # type: ignore[no-untyped-def]
    """Save and reload an image whose top layer no other tag holds: a real load."""
    import io
    import tarfile

    tag = f"pftest/cold-{uuid.uuid4().hex[:10]}:latest"
    cleanup_images.append(tag)
    dockerfile = f"FROM python:3.11-slim\nRUN head -c 8000000 /dev/urandom > /blob && echo {tag}\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile.encode()))
    buf.seek(0)
    lines: list[str] = []
    out = docker_engine.build(buf, tag=tag, dockerfile="Dockerfile", cache_from=[],
                              nocache=False, labels={}, on_line=lines.append)
    assert out.ok, lines[-5:]
    saved = cache.save_tarball(docker_engine, tag, tmp_path, "cold", level=3, threads=2)
    docker_engine.remove(tag)
    assert docker_engine.inspect(tag) is None
    image_id = out.image_id
    assert image_id is not None
    loaded, image = cache.load_tarball(docker_engine, Path(saved.path), tag)
    again = docker_engine.inspect(tag)
    assert again is not None and again.id == image_id == image.id
    assert loaded.sha256 == saved.sha256

    # the same image as another tool would leave it: a plain `docker save` tar
    plain = tmp_path / "other" / "cold.tar"
    plain.parent.mkdir()
    with open(plain, "wb") as fh:
        for chunk in docker_engine.save(tag):
            fh.write(chunk)
    docker_engine.remove(tag)
    assert cache.find_tarball(plain.parent, "cold") == plain
    loaded_plain, _ = cache.load_tarball(docker_engine, plain, tag)
    assert loaded_plain.compression == "none" and docker_engine.inspect(tag).id == image_id
