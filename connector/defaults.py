"""Resource defaults shared by the library (``ConnectorOptions``, ``ResourceManager``) and
the ``up`` command's flags, kept here so the CLI does not import the connector to print
its help."""

from __future__ import annotations

# Ports handed to replicas. Dynamo's runtime reads DYN_SYSTEM_PORT as a signed 16-bit
# number, so no replica port may go above HIGHEST_REPLICA_PORT.
PORT_RANGE: tuple[int, int] = (20000, 29999)
HIGHEST_REPLICA_PORT = 32767
# A GPU that processes not ours use beyond this is not handed out.
GPU_FOREIGN_MEMORY_THRESHOLD_BYTES = 1 << 30
# How long a release waits for a stopped replica's processes to exit and NVML to let go.
RELEASE_TIMEOUT_S = 30.0
