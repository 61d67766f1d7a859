"""Templates in commands, args, envs and readiness URLs: their values for one replica."""

from __future__ import annotations

import pytest

from connector.graph import templates
from connector.resources.manager import Reservation

A, B = "GPU-aaaa", "GPU-bbbb"


@pytest.mark.parametrize(
    ("gpus", "fraction", "fields"),
    [
        ((A, B), 0.0, {"count": "2", "fraction": "1", "uuids": f"{A},{B}"}),
        ((A,), 0.25, {"count": "1", "fraction": "0.25", "uuids": A}),
        ((), 0.0, {"count": "0", "fraction": "0", "uuids": ""}),
    ],
)
def test_gpu_fields(gpus: tuple[str, ...], fraction: float, fields: dict[str, str]) -> None:
    assert templates.gpu_fields(gpus, fraction) == fields
    reservation = Reservation("Decode/1", "Decode", gpus=gpus, gpu_fraction=fraction)
    assert reservation.gpu_fields() == fields


def test_expand_fills_every_kind_and_names_what_is_missing() -> None:
    values = templates.values_of(
        {"http": 20001}, {"kv": "/wd/sock/decode-1-kv.sock"}, templates.gpu_fields((A, B), 0)
    )
    text = "--port {port.http} --kv {socket.kv} -tp {gpu.count} --gpus={gpu.uuids}"
    assert templates.expand(text, values) == (
        f"--port 20001 --kv /wd/sock/decode-1-kv.sock -tp 2 --gpus={A},{B}"
    )
    assert templates.expand("no templates {here}", values) == "no templates {here}"
    with pytest.raises(KeyError, match=r"\{port\.rpc\} is not allocated to this replica"):
        templates.expand("{port.rpc}", values)
    # Without a GPU the fields still have values: a command can always say {gpu.count}.
    assert templates.expand("{gpu.count}/{gpu.fraction}", templates.values_of({}, {})) == "0/0"


def test_undeclared_lists_what_the_graph_does_not_declare() -> None:
    declared = {"port": ["http"], "socket": []}
    text = "{port.http} {port.rpc} {socket.kv} {gpu.count} {gpu.vram}"
    assert list(templates.undeclared(text, declared)) == [
        ("{port.rpc}", "port"),
        ("{socket.kv}", "socket"),
        ("{gpu.vram}", "gpu"),
    ]
