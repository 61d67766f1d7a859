"""The open files limit: raised to the hard limit before circusd starts, so a session's
default soft limit (1,024 on a desktop) does not cap how many replicas run.

Each test runs in a child interpreter that first lowers its own soft limit, as a desktop
session would have it, so the pytest process keeps its limits."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from connector.supervision.open_files import MOST


def _run(script: str, cwd: Path, timeout_s: float = 120) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _raised_to(hard: int) -> int:
    """The soft limit the connector should end with under hard limit ``hard``."""
    return MOST if hard == resource.RLIM_INFINITY else min(hard, MOST)


def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    got = _run(
        """
        import json, resource
        from connector.supervision.open_files import raise_open_files_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        now = raise_open_files_limit()
        again = raise_open_files_limit()  # already raised: left as it is
        print(json.dumps({"now": now, "again": again,
                          "limits": resource.getrlimit(resource.RLIMIT_NOFILE)}))
        """,
        tmp_path,
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _raised_to(hard)
    assert got == {"now": wanted, "again": wanted, "limits": [wanted, hard]}


@pytest.mark.integration
def test_a_scale_needing_more_descriptors_than_the_soft_limit_gets_ready(
    tmp_path: Path,
) -> None:
    """80 replicas hold 320 descriptors in circusd (two pipes and two log files each): under
    a soft limit of 256 left as it was, 18 of them exited at their spawn (EMFILE) and the
    scale never converged."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit on open files here is {hard}")
    got = _run(
        f"""
        import asyncio, json, resource
        from pathlib import Path
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        from tests.core_helpers import make_graph, svc
        from connector.local import ConnectorOptions, LocalConnector

        async def main():
            graph = make_graph(svc("Sleep", max_replicas=80), name="fd")
            options = ConnectorOptions(discovery="none", gpu_backend="none", max_replicas=80)
            conn = LocalConnector("fd", graph, Path({str(tmp_path)!r}) / "wd", options)
            await conn.initialize()
            try:
                converged = await conn.scale_component("Sleep", 80, timeout_s=90)
                phases = sorted(r.phase for r in conn.state.replicas_of("Sleep"))
                limits = Path(f"/proc/{{conn.supervisor.info.pid}}/limits").read_text()
            finally:
                await conn.shutdown()
            soft_in_circusd = next(
                line.split()[3] for line in limits.splitlines() if "open files" in line
            )
            print(json.dumps({{"converged": converged, "phases": phases,
                               "circusd_soft": soft_in_circusd}}))

        asyncio.run(main())
        """,
        Path(__file__).parent.parent,
    )
    assert got == {
        "converged": True,
        "phases": ["ready"] * 80,
        "circusd_soft": str(_raised_to(hard)),
    }
