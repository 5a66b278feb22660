"""Deterministic Dockerfiles: the same profile and variant give the same bytes.

The rules are in docs/design.md ("The Dockerfile").

Nothing here reads the clock, the host or the order of keys in the profile file: env is
sorted, commands keep their given order, and every value is escaped for Dockerfile syntax.
"""

from __future__ import annotations

from dataclasses import dataclass

from pfbuild.client.profile import Profile

__all__ = ["VARIANTS", "Variant", "dockerfile_name", "escape_env_value", "render"]

BASE_PACKAGES = ("git", "build-essential", "curl")
BUILDER_PACKAGES = ("python3-dev", "libffi-dev")


@dataclass(frozen=True)
class Variant:
    """A rung of the retry ladder: which apt sources and which system packages."""

    builder: bool = False
    archive: bool = False
    unauth: bool = False

    @property
    def name(self) -> str:
        parts = [p for p, on in (("builder", self.builder), ("archive", self.archive)) if on]
        if self.unauth:
            parts.append("unauth")
        return "-".join(parts) or "standard"

    @staticmethod
    def named(name: str) -> Variant:
        return VARIANTS[name]


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(),
        Variant(builder=True),
        Variant(archive=True),
        Variant(archive=True, unauth=True),
        Variant(builder=True, archive=True),
        Variant(builder=True, archive=True, unauth=True),
    )
}


def dockerfile_name(variant: Variant) -> str:
    return "Dockerfile" if variant.name == "standard" else f"Dockerfile.{variant.name}"


def escape_env_value(value: str) -> str:
    """Quote a value for ``ENV K="..."`` so it reaches the container unchanged.

    Inside double quotes the Dockerfile parser treats ``\\`` as an escape and expands
    ``$``; escaping both (and ``"``) makes the value literal.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _archive_sources(archive_url: str, unauth: bool) -> str:
    base = archive_url.rstrip("/")
    # Rewrite every configured mirror (one-line and deb822 formats) to the archive, drop
    # the -updates suites the archive does not carry, and accept its expired Release files.
    sed = (
        "sed -i -E"
        f" -e 's#https?://[^ ]+/debian-security#{base}/debian-security#g'"
        f" -e 's#https?://[^ ]+/debian([ /]|$)#{base}/debian\\1#g'"
        " -e '/^deb(-src)? .*-updates/d'"
        " -e 's/^(Suites:.*) [a-z]+-updates/\\1/'"
    )
    conf = 'Acquire::Check-Valid-Until \\"false\\";'
    if unauth:
        conf += (
            ' Acquire::AllowInsecureRepositories \\"true\\";'
            ' APT::Get::AllowUnauthenticated \\"true\\";'
        )
    return (
        "RUN for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do "
        f'if [ -f "$f" ]; then {sed} "$f"; fi; done; '
        f'echo "{conf}" > /etc/apt/apt.conf.d/99pfbuild-archive'
    )


def render(profile: Profile, variant: Variant, *, base_image: str, archive_url: str) -> str:
    """The Dockerfile text for ``profile`` built as ``variant``."""
    packages = BASE_PACKAGES + (BUILDER_PACKAGES if variant.builder else ())
    flag = " --allow-unauthenticated" if variant.unauth else ""
    lines = [f"FROM {base_image}"]
    if variant.archive:
        lines.append(_archive_sources(archive_url, variant.unauth))
    lines.append(
        f"RUN apt-get update && apt-get install -y{flag} {' '.join(packages)}"
        " && rm -rf /var/lib/apt/lists/*"
    )
    lines += ["WORKDIR /workspace", "COPY . /workspace"]
    lines += [f"ENV {key}={escape_env_value(profile.env[key])}" for key in sorted(profile.env)]
    lines += [f"RUN {cmd}" for cmd in profile.install_cmds if cmd.strip()]
    return "\n".join(lines) + "\n"
