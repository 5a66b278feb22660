"""The reference a CLI hit is measured against (``pfbuild bench cli``): a script that
imports the docker SDK, reads the request (and its profile, which names its id) and asks
the engine for the profile's image. Run as a file, it imports nothing of pfbuild."""

import json
import sys

import docker


def main() -> None:
    request = json.load(sys.stdin)
    with open(request["profile_path"]) as fh:
        profile_id = json.load(fh)["profile_id"]
    image = docker.from_env().images.get(f"patchfoundry/{profile_id}:latest")
    print(json.dumps({"image_tag": image.tags[0], "image_id": image.id}))


if __name__ == "__main__":
    main()
