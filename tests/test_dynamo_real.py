"""Proof that the real Dynamo 1.6.1 runs here: frontend + mocker on loopback, the tiny model.

A real etcd, a real ``python -m dynamo.mocker`` (aggregated) serving the tiny model of
:mod:`connector.dynamo.tiny_model`, and a real ``python -m dynamo.frontend``. The frontend must list
the model and answer a chat completion; etcd must hold the worker's instance key, whose
advertised request-plane port the worker's own PID listens on; the worker's ``/metrics``
(``DYN_SYSTEM_PORT``) must carry ``dynamo_component_*`` series of our namespace; SIGTERM
must take the worker out of discovery. Everything is started and stopped by PID through
:mod:`tests.dynamo_helpers`, which later end-to-end tests under dynamo-local reuse.

The tiny model's own guarantees (deterministic, idempotent, a vocabulary the mocker's token
ids decode in, a chat template) are checked first, without Dynamo processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from connector.dynamo import tiny_model
from connector.dynamo.tiny_model import write_tiny_model
from tests.dynamo_helpers import (
    TINY_MODEL_NAME,
    DynamoLauncher,
    etcd_prefix,
    instances,
    require_dynamo,
)
from tests.servers import LOOPBACK, EtcdServer, wait_until

NS = "dynreal"


# --------------------------------------------------------------------------- tiny model


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_model_is_deterministic_idempotent_and_decodes_mocker_ids(tmp_path: Path) -> None:
    require_dynamo()
    from tokenizers import Tokenizer

    first = write_tiny_model(tmp_path / "a")
    second = write_tiny_model(tmp_path / "b")
    assert first == tmp_path / "a" / TINY_MODEL_NAME
    assert _files(first) == _files(second), "two writes must give the same bytes"

    # A complete folder of this version is left alone: nothing is rewritten.
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert write_tiny_model(tmp_path / "a") == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps

    # An incomplete folder or one of another version is rewritten.
    (first / "tokenizer.json").unlink()
    marker = json.loads((first / tiny_model.MARKER).read_text())
    (first / tiny_model.MARKER).write_text(json.dumps({**marker, "version": 0}))
    write_tiny_model(tmp_path / "a")
    assert _files(first) == _files(second)

    config = json.loads((first / "config.json").read_text())
    assert config["vocab_size"] == tiny_model.VOCAB_SIZE > 2000
    assert config["max_position_embeddings"] == tiny_model.CONTEXT_LENGTH
    assert "chat_template" in json.loads((first / "tokenizer_config.json").read_text())

    tokenizer = Tokenizer.from_file(str(first / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == tiny_model.VOCAB_SIZE
    # The mocker answers with random ids in [1000, 2000): each must decode to some text.
    assert all(tokenizer.decode([i]).strip() for i in range(1000, 2000))
    assert tokenizer.decode(tokenizer.encode("hello there, world").ids) == "hello there, world"

    with pytest.raises(tiny_model.TinyModelError, match="one path component"):
        write_tiny_model(tmp_path, "../escape")


def test_tiny_model_cli_and_lazy_tokenizers_import(tmp_path: Path) -> None:
    require_dynamo()
    out = subprocess.run(
        [sys.executable, "-m", "connector.dynamo.tiny_model", str(tmp_path), "--name", "m"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == str(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    # Importing the module (and the connector package) must not need tokenizers.
    probe = "import sys, connector, connector.dynamo.tiny_model; print('tokenizers' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "False"


# --------------------------------------------------------------------------- real Dynamo


def _post_json(url: str, payload: dict[str, Any], timeout: float = 30.0) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text: str = resp.read().decode()
        return text


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_real_frontend_serves_real_mocker(etcd_server: EtcdServer, dynamo: DynamoLauncher) -> None:
    worker = dynamo.mocker(NS, etcd_server.url)
    frontend = dynamo.frontend(NS, etcd_server.url)

    assert frontend.models() == [TINY_MODEL_NAME]

    status, answer = _post_json(
        f"{frontend.url}/v1/chat/completions",
        {
            "model": TINY_MODEL_NAME,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8,  # the mocker rejects a request without it
        },
    )
    assert status == 200, f"{status}: {answer}\nfrontend log:\n{frontend.log_tail()}"
    content = answer["choices"][0]["message"]["content"]
    assert isinstance(content, str) and content.strip(), answer
    assert answer["usage"]["completion_tokens"] == 8, answer

    keys = etcd_prefix(etcd_server.url, f"v1/instances/{NS}/backend/generate/")
    assert any(re.fullmatch(rf"v1/instances/{NS}/backend/generate/[0-9a-f]+", k) for k in keys), (
        sorted(keys)
    )
    # The key's advertised request-plane address is a loopback port this worker listens on.
    own = worker.own_instances()
    assert len(own) == 1, (own, instances(etcd_server.url, NS, "backend"))
    assert own[0].host == LOOPBACK
    assert own[0].key in keys

    series = wait_until(
        lambda: [
            line
            for line in _get_text(worker.metrics_url).splitlines()
            if line.startswith("dynamo_component_") and f'dynamo_namespace="{NS}"' in line
        ],
        timeout=30,
    )
    assert series

    # SIGTERM takes the worker out of discovery (its keys go with it) before it exits.
    worker.stop()
    wait_until(lambda: not etcd_prefix(etcd_server.url, f"v1/instances/{NS}/"), timeout=15)
