"""Everything that speaks Dynamo: discovery (etcd and file backends, the bridge that
turns it into readiness and drains), the Planner's executor and connector interface,
the prefill queue, the topology, the private etcd and the tiny offline model."""
