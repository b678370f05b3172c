"""The edge: aiohttp app serving the OCI Distribution API and the admin endpoints."""
