"""dynamo-local exporter: metrics and traces of a supervised Dynamo graph."""
