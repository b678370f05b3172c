"""Seawall's long-running services: the edge, the scheduler and the command line."""
