"""Helpers that run real third-party servers and clients for the tests."""
