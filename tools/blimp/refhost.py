"""The reference host: QEMU 7.2 with blimp's balloon patches (chunked inflate,
MUST_TELL_HOST, old hosts' used lengths and queue numbering, all behind device
properties), built and cached by
tools/reference-host/build.sh.  See tools/reference-host/README.md."""

from __future__ import annotations

import os
import subprocess
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_SCRIPT = os.path.join(REPO, "tools", "reference-host", "build.sh")
ENV_VAR = "BLIMP_REFERENCE_QEMU"

#: device properties the patch adds to virtio-balloon-*
CHUNKS = "x-chunks=on"
MUST_TELL_HOST = "must-tell-host=on"
#: hosts as they were: QEMU < 7.0's used lengths (bytes read) and crosvm's fixed queue
#: indices before 2025 (stats 2, hint 3, reporting 4); qemu-7.2-balloon-quirks.patch
USED_LEN_BYTES_READ = "x-used-len-bytes-read=on"
FIXED_QUEUE_INDEX = "x-fixed-queue-index=on"
#: feature bits (virtio 5.5.3; docs/chunked-inflate.md)
F_MUST_TELL_HOST = 1 << 0
F_X_CHUNKS = 1 << 23


class ReferenceHostError(RuntimeError):
    pass


def reference_qemu(build: bool = True, timeout: float = 3600.0) -> str:
    """Path of the reference host's qemu-system-x86_64: $BLIMP_REFERENCE_QEMU if set, else
    the cached build for the current patch, building it first when `build` (minutes)."""
    path: Optional[str] = os.environ.get(ENV_VAR)
    if path:
        if not os.access(path, os.X_OK):
            raise ReferenceHostError("%s=%s is not an executable" % (ENV_VAR, path))
        return path
    argv = [BUILD_SCRIPT] if build else [BUILD_SCRIPT, "--path"]
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        raise ReferenceHostError("%s failed (status %d)" % (" ".join(argv), r.returncode))
    return lines[-1]
