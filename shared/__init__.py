"""Seawall's domain and adapters, shared by the edge, the workers and the scheduler."""
