"""Seawall test suite."""
