"""The graph: its model, and the two front doors that build one (YAML files and the
Python API). Imports nothing of the connector but its errors."""
