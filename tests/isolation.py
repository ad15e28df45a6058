"""Running a test's script in a private mount namespace: a read-only bind mount, a tiny tmpfs (a full disk).

Mounts need root, or a user namespace where unprivileged ones are allowed; where neither works the test that
needs them skips with the reason.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest


def _unshare_prefix() -> list[str]:
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux `unshare` for a private mount namespace")
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    pytest.skip("mounts are not permitted here (neither as root nor in a user namespace)")


def run_with_mounts(mounts: list[str], python: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python` (a script's text) with `args` after `mounts` (shell commands) in a private mount namespace."""
    script = " && ".join(mounts + [shlex.join([sys.executable, "-c", python, *args])])
    return subprocess.run([*_unshare_prefix(), "sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def read_only_bind(source, target) -> list[str]:
    return [f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}",
            f"mount -o remount,bind,ro {shlex.quote(str(target))}"]
