"""The storage lifecycle: garbage collection, cache eviction, tag retention, quotas."""
