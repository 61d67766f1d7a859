"""Grafana dashboards as code (grafana-foundation-sdk); see ``dashboards/generate.py``."""
