"""`make bench`: Seawall against CNCF Distribution (see BENCHMARKS.md and bench/__main__.py)."""
