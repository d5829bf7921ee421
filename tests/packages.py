"""Installing what some tests need from Debian, as the README's test command
promises on a fresh machine: as root with apt-get, else one clear error."""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_install(*packages: str) -> None:
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise RuntimeError(
            f"these tests need Debian's {' and '.join(packages)}: "
            f"apt-get install {' '.join(packages)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", *packages]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, timeout=600, check=True)
        subprocess.run(install, env=env, capture_output=True, timeout=600, check=True)
