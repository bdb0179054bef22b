"""Named crash points for the fault harness.

``CAS_CRASH_AT=<name>[:<n>]`` makes the process SIGKILL itself the n-th time
(default: the first) it passes ``crash_point(<name>)``. Unset, a crash point
costs one dictionary lookup. Tests use it to kill real subprocesses at exact
steps of a save; nothing else reads it.
"""

from __future__ import annotations

import os
import signal

_passed: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("CAS_CRASH_AT")
    if not spec:
        return
    target, _, count_text = spec.partition(":")
    if target != name:
        return
    seen = _passed.get(name, 0) + 1
    _passed[name] = seen
    if seen >= int(count_text or "1"):
        os.kill(os.getpid(), signal.SIGKILL)
