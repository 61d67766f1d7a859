"""The circusd the connector runs: Circus's own daemon, with a spawn that needs no fork.

``python -m connector.supervision.circusd_program CONFIG`` is ``circusd CONFIG`` with one
change: a watcher's process is started the way :mod:`subprocess` starts one with no
``preexec_fn``. Circus always hands ``Popen`` a Python ``preexec_fn`` (to detach stdin,
call ``setsid``, set limits and ids), and a ``preexec_fn`` forces a real ``fork()`` of
circusd, whose page tables and descriptor table grow with every replica it holds (a pipe
pair and two log files each). Without one, CPython starts the child with ``vfork()``. The
connector's watchers need nothing the preexec does that ``Popen`` cannot do itself
(``stdin=DEVNULL``, ``start_new_session=True``): measured in a 60 MB process holding
1,000 descriptors, a spawn took 4.6-5.0 ms with the preexec and 1.2-1.3 ms without, and
circusd runs one spawn at a time, so this is the floor of every scale-up.

A watcher that does use what only the preexec can do (resource limits, another user or
group, a socket on stdin, a closed stdout or stderr) is spawned by Circus's own code,
unchanged. Everything else (commands, streams, hooks, pub/sub) is Circus's.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import circus.arbiter
import circus.circusd
from circus.process import Process
from circus.watcher import Watcher
from psutil import Popen


class VforkProcess(Process):  # type: ignore[misc]
    """A Circus process that starts its command without running Python in the child."""

    def _needs_preexec(self) -> bool:
        return bool(
            self.rlimits
            or self.uid is not None
            or self.gid is not None
            or self.close_child_stdout
            or self.close_child_stderr
            or self._get_stdin_socket_fd() is not None
        )

    def spawn(self) -> None:
        if self._needs_preexec():
            super().spawn()
            return
        # What Process.spawn does, with the preexec's two remaining jobs given to Popen.
        self.started = time.time()
        args = self.format_args(sockets_fds=self._get_sockets_fds())
        self._worker = Popen(
            args,
            cwd=self.working_dir,
            shell=self.shell,
            env=self.env,
            close_fds=not self.use_fds,
            executable=self.executable,
            stdin=subprocess.DEVNULL if self.close_child_stdin else None,
            stdout=subprocess.PIPE if self.pipe_stdout else None,
            stderr=subprocess.PIPE if self.pipe_stderr else None,
            start_new_session=True,  # the preexec's os.setsid()
        )
        self._sockets: list[Any] = []  # let go of sockets made only for this child to inherit


class VforkWatcher(Watcher):  # type: ignore[misc]
    """A Circus watcher whose processes are :class:`VforkProcess` (``_process_class`` is
    the hook Circus gives subclasses for this)."""

    @property
    def _process_class(self) -> Any:
        return VforkProcess


def main() -> None:
    # The arbiter makes every watcher (the add command's included) through this name.
    circus.arbiter.Watcher = VforkWatcher
    circus.circusd.main()


if __name__ == "__main__":
    main()
