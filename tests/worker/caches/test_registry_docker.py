"""The registry tier on two real engines and a real registry (`bash .ci/hosts.sh`)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pytest

from pfbuild.client.models import BuildRequest
from pfbuild.client.settings import Settings
from tests.fakes import drop_image
from tests.fakes import run_request as run_build
from tests.hostsupport import BuildCounter, delete_from_registry

pytestmark = pytest.mark.docker


def test_built_on_a_is_answered_on_b_from_the_registry_without_a_build(
    docker_engine, host_b, registry_addr: str, hello_repo: Path, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    profile = json.loads((hello_repo / "repo_profile.json").read_text())
    profile["env"]["PFTEST_NONCE"] = uuid.uuid4().hex
    on_a = Settings(tmp_dir=tmp_path / "a-tmp", host_id="a", registry=registry_addr)
    on_b = Settings(tmp_dir=tmp_path / "b-tmp", host_id="b", registry=registry_addr)
    repo_b = tmp_path / "repo-b"
    shutil.copytree(hello_repo, repo_b)
    built = None
    try:
        with BuildCounter(docker_engine) as on_a_events, BuildCounter(host_b) as on_b_events:
            built = run_build(BuildRequest(repo_dir=str(hello_repo), profile=profile), on_a,
                              docker_engine)
            assert built.cache_source == "built" and built.manifest.registry is not None
            assert built.manifest.registry.digest.startswith("sha256:")
            fetched = run_build(BuildRequest(repo_dir=str(repo_b), profile=profile), on_b, host_b)
            time.sleep(1)  # let the last events arrive
        pid = built.profile_id
        assert fetched.cache_source == "registry" and fetched.attempts == []
        assert fetched.image_id == built.image_id
        pushed, pulled = built.manifest.registry, fetched.manifest.registry
        assert pulled is not None and (pulled.reference, pulled.digest) == (
            pushed.reference, pushed.digest)
        # what crossed: B holds the base layers, so only what A's build added came over
        print(f"pushed {pushed.bytes} B of layers, pulled {pulled.bytes} B")
        assert pulled.bytes > 0
        assert (on_a_events.builds[pid], on_b_events.builds[pid]) == (1, 0)
        assert built.image_tag in host_b.tags("patchfoundry")
        print(f"\npush {built.timings.push:.2f}s, save {built.timings.save:.2f}s "
              f"({built.manifest.tarball.size if built.manifest.tarball else 0} B), "
              f"pull on B {fetched.timings.pull:.2f}s")
    finally:
        if built is not None:
            drop_image(docker_engine, built.image_tag)
            drop_image(host_b, built.image_tag)
            if built.manifest.registry is not None:
                delete_from_registry(registry_addr, f"patchfoundry/{built.profile_id}",
                                     built.manifest.registry.digest)
