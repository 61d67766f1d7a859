"""Desired state against observed state: the loop, the replica actions and their
restart policy, adoption after a restart, the persisted state and the read-only view.
Knows nothing of Dynamo: interop plugs in through ``Hooks``."""
