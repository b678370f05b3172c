"""Dramatiq workers: fills, prefetch and maintenance jobs, run by `dramatiq workers.actors`."""
