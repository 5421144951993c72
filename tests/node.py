"""Node.js programs the tests run, with their npm packages installed on first use.

Each program lives in a directory with a ``package.json`` that pins its packages
(``tests/judges/node``: Express as a judge upstream; ``tests/clients/node``: the Vercel AI SDK as
a client). ``npm install`` fills its ``node_modules`` when a package is missing; the
``node_modules`` and lockfiles it writes are git-ignored."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

NODE_HELP = ("this test needs Node.js (>= 18) and npm from the OS packages: "
             "`apt-get install nodejs npm` (the CI machines have node 20 and npm 11); the npm "
             "packages themselves are installed by the test setup")


class NodeUnavailable(RuntimeError):
    """Node or the packages cannot be had on this machine; the message says what to install."""


def node_ready(package_dir: Path) -> str:
    """The ``node`` executable, after ``npm install`` in ``package_dir`` when any of the
    packages its ``package.json`` lists is missing."""
    node = shutil.which("node")
    if node is None:
        raise NodeUnavailable(f"no `node` on PATH: {NODE_HELP}")
    wanted = json.loads((package_dir / "package.json").read_text(encoding="utf-8"))
    missing = [name for name in wanted.get("dependencies", {})
               if not (package_dir / "node_modules" / name / "package.json").exists()]
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            raise NodeUnavailable(f"no `npm` on PATH to install {', '.join(missing)}: {NODE_HELP}")
        done = subprocess.run(
            [npm, "install", "--prefix", str(package_dir), "--no-audit", "--no-fund"],
            cwd=package_dir, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise NodeUnavailable(
                f"`npm install --prefix {package_dir}` failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return node
