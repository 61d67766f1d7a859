"""Makes a replica die with its supervisor.

circusd starts every replica through a launcher that sets ``PR_SET_PDEATHSIG`` (SIGKILL)
and then execs the real command, so the replica keeps its pid and is killed by the kernel
the moment circusd dies, even on SIGKILL. util-linux ``setpriv --pdeathsig`` does this with
no interpreter start-up cost (and ``taskset`` pins CPU cores); this module is the fallback
where either is missing: ``python -m connector.supervision.launcher [--cpus 0,2] -- CMD ARGS...``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import sys

PR_SET_PDEATHSIG = 1


@functools.cache
def _tool(name: str) -> str | None:
    # Looked up once per process, not on every spawn.
    return shutil.which(name)


def launcher_prefix(cpus: tuple[int, ...] = ()) -> list[str]:
    """The argv prefix that runs a command with parent-death signal (and CPU pinning)."""
    setpriv = _tool("setpriv")
    taskset = _tool("taskset") if cpus else None
    if setpriv and (taskset or not cpus):
        prefix = [setpriv, "--pdeathsig", "KILL", "--"]
        if taskset:
            prefix += [taskset, "-c", ",".join(str(c) for c in cpus)]
        return prefix
    # Either tool missing: this module does both, so pinning is never silently dropped.
    prefix = [sys.executable, "-m", "connector.supervision.launcher"]
    if cpus:
        prefix += ["--cpus", ",".join(str(c) for c in cpus)]
    return [*prefix, "--"]


USAGE = "usage: python -m connector.supervision.launcher [--cpus 0,2] -- COMMAND [ARGS...]"


def main(argv: list[str]) -> int:
    cpus: set[int] = set()
    if argv[:1] == ["--cpus"]:
        try:
            cpus = {int(c) for c in argv[1].split(",")}
        except (IndexError, ValueError):
            print(f"launcher: --cpus takes core numbers like 0,2\n{USAGE}", file=sys.stderr)
            return 2
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)  # inherited across exec, as taskset does it
        except OSError as exc:
            print(f"launcher: cannot pin to CPUs {sorted(cpus)}: {exc.strerror}", file=sys.stderr)
            return 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"launcher: prctl failed: errno {ctypes.get_errno()}", file=sys.stderr)
        return 1
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        return 1
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"launcher: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
