"""Opening a discovery backend by name: the one module that knows both backends, so that the
backends import the shared model (:mod:`connector.dynamo.discovery.cache`) and nothing imports them
back."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from connector.dynamo.discovery.cache import Discovery
from connector.dynamo.discovery.etcd import EtcdDiscovery
from connector.dynamo.discovery.file import FileDiscovery


def open_discovery(
    kind: str,
    *,
    file_root: Path | None = None,
    etcd_url: str | None = None,
    namespaces: Iterable[str] = (),
) -> Discovery:
    """A (not yet started) discovery backend.

    ``kind`` is ``"file"`` (needs ``file_root``, Dynamo's ``DYN_FILE_KV``) or ``"etcd"``
    (needs ``etcd_url``, e.g. ``http://127.0.0.1:2379``). ``namespaces`` are Dynamo
    namespaces whose early-2025 keys (``{ns}/components/...``) are read as well.
    """
    if kind == "file":
        if file_root is None:
            raise ValueError("file discovery needs a root directory (DYN_FILE_KV)")
        return FileDiscovery(file_root)
    if kind == "etcd":
        if not etcd_url:
            raise ValueError("etcd discovery needs an etcd URL (ETCD_ENDPOINTS)")
        return EtcdDiscovery(etcd_url, namespaces=namespaces)
    raise ValueError(f"unknown discovery backend {kind!r}: expected 'file' or 'etcd'")
