"""The CLI's tables are pure functions of the API's JSON: rendered here without a server."""

from __future__ import annotations

from rich.console import Console

from connector.cli import render
from tests.test_cli import cells


def test_resources_tables_show_lingering_replicas_and_a_machine_without_gpus() -> None:
    console = Console(width=200, no_color=True, record=True)
    view = {
        "gpus": [],
        "gpu_backend": "GPU backend disabled (gpu backend 'none')",
        "cpu": {"allocatable_cores": 8.0, "reserved_cores": 2.0},
        "memory": {"allocatable_bytes": 16 << 30, "reserved_bytes": 1 << 30},
        "ports": {},
        "sockets": {"Frontend/1": {"rpc": "/wd/sock/frontend-1-rpc.sock"}},
        "lingering": [
            {
                "replica": "Decode/1",
                "pids": [4242, 4250],
                "reservation": {"cpu_cores": 2.0, "ports": {"system": 20001}, "gpus": []},
            }
        ],
    }
    for table in render.resources_tables(view):
        console.print(table)
    rows = [cells(line) for line in console.export_text().splitlines()]
    no_gpu = ["-", "-", "no", "GPU:", "GPU", "backend", "disabled", "(gpu", "backend", "'none')"]
    assert no_gpu in rows
    assert ["Frontend/1", "-", "rpc=/wd/sock/frontend-1-rpc.sock"] in rows
    assert ["Decode/1", "4242,4250", "-", "2", "-", "system=20001"] in rows
    title = ["Stopped", "replicas", "still", "running", "(their", "resources", "stay", "held)"]
    assert title in rows
