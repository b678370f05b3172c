"""The OCI distribution and image domain: digests, names, media types, manifests, errors."""
