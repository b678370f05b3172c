"""The pull-through cache: revalidating manifests, single-flight blob fills that clients follow."""
