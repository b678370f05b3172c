"""The registry's bucket: object layout, storage adapter, blobs, repositories, uploads."""
