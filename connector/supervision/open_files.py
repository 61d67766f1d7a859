"""The limit on open files, raised for the connector and the circusd it starts.

Each replica holds file descriptors for as long as it runs: in circusd its two output pipes
and its two log files, in the connector a pidfd its exit is awaited on. A desktop session's
default soft limit is 1,024, so circusd ran out near 250 replicas (a replica's spawn then
fails with EMFILE and it backs off, never ready), and the connector near 1,000; the hard
limit, which an unprivileged process may raise its soft limit to, is far higher (524,288
under systemd). The soft limit is raised to the hard one once, before circusd starts, and
circusd and the replicas inherit it.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# The kernel refuses a soft limit above fs.nr_open (1,048,576 unless changed), and an
# "unlimited" hard limit is refused as a soft one.
MOST = 1 << 20


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (at most
    :data:`MOST`); never lowers it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MOST if hard == resource.RLIM_INFINITY else min(hard, MOST)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:  # e.g. above fs.nr_open where it was lowered
            log.warning("could not raise the open files limit from %d to %d: %s", soft, wanted, exc)
            return soft
        return wanted
    return soft
