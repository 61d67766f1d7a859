"""Dynamo discovery: its key formats, the two backends, the cache they fill,
which replica owns each instance, and the bridge to the reconcile loop."""
