"""Raw SeaweedFS throughput through the minio SDK, the ceiling under Seawall's own figures.

`python -m bench.s3raw`: one 100 MiB object written with one part in flight and with four,
read back, and copied server-side, on a fresh embedded S3 server.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

from minio.commonconfig import CopySource

from services.embedded import start_s3

SIZE_MIB = 100


def main() -> None:
    data = os.urandom(SIZE_MIB * 1024 * 1024)
    with tempfile.TemporaryDirectory() as work, start_s3(Path(work)) as s3:
        client = s3.client()
        client.make_bucket("raw")
        figures = {}
        for parallel in (1, 4):
            started = time.perf_counter()
            client.put_object(
                "raw", f"w{parallel}", io.BytesIO(data), len(data), part_size=8 * 1024 * 1024,
                num_parallel_uploads=parallel,
            )  # fmt: skip
            figures[f"write, {parallel} part(s) in flight"] = SIZE_MIB / (time.perf_counter() - started)
        started = time.perf_counter()
        response = client.get_object("raw", "w1")
        while response.read(1024 * 1024):
            pass
        response.close()
        response.release_conn()
        figures["read"] = SIZE_MIB / (time.perf_counter() - started)
        started = time.perf_counter()
        client.copy_object("raw", "copy", CopySource("raw", "w1"))
        figures["server-side copy"] = SIZE_MIB / (time.perf_counter() - started)
    for name, mib_s in figures.items():
        print(f"{name}: {mib_s:.0f} MiB/s")


if __name__ == "__main__":
    main()
