"""Replication: rules that copy images between local projects and upstreams, and the record of their runs.

`rules` holds the rules as `seawall.yaml` states them (filters, triggers, naming at the
destination) and their checks against the projects and upstreams; `records` the models
of an execution and its tasks; `store` where those live (Redis while running, the bucket
once finished); `triggers` what starts a run (cron, on push, by hand); `run` what a run
copies and deletes, and stopping or retrying one.
"""
