"""Pytest configuration: the shared fixture plugins."""

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.edge",
    "tests.fixtures.clients",
    "tests.fixtures.deploy",
    "tests.fixtures.proxy",
    "tests.fixtures.seeded_hub",
    "tests.fixtures.stack",
]
