"""Raw SeaweedFS throughput through the minio SDK, the ceiling under Seawall's own figures.

`python -m bench.s3raw`: one 100 MiB object written with one part in flight and with four,
read back, and copied server-side, on a fresh embedded S3 server; with each rate, the
server's own CPU-seconds per GiB moved (its process, from /proc).

`python -m bench.s3raw ingest --endpoint ... FILE...`: the store's own ingest for P8. Every
file is written as one object, one after another (skopeo 1.9 pushes an image's blobs one at
a time), each in multipart parts of the edge's own size with as many in flight as the edge
keeps (`shared.registry.storage`), through the same SDK and signing. Prints the seconds from the
first byte sent to the last upload completed, as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import urllib3
from minio import Minio
from minio.commonconfig import CopySource

from bench.stack import cpu_seconds
from services.embedded import start_s3
from shared.registry.storage import PARALLEL_PARTS, PART_SIZE

SIZE_MIB = 100


def micro() -> None:
    data = os.urandom(SIZE_MIB * 1024 * 1024)
    with tempfile.TemporaryDirectory() as work, start_s3(Path(work)) as s3:
        client = s3.client()
        client.make_bucket("raw")
        figures: dict[str, tuple[float, float]] = {}

        def measure(name: str, work: Callable[[], object]) -> None:
            cpu, started = cpu_seconds(s3.pid), time.perf_counter()
            work()
            seconds = time.perf_counter() - started
            figures[name] = (SIZE_MIB / seconds, (cpu_seconds(s3.pid) - cpu) / (SIZE_MIB / 1024))

        for parallel in (1, 4):
            measure(
                f"write, {parallel} part(s) in flight",
                partial(
                    client.put_object, "raw", f"w{parallel}", io.BytesIO(data), len(data),
                    part_size=8 * 1024 * 1024, num_parallel_uploads=parallel,
                ),
            )  # fmt: skip

        def read() -> None:
            response = client.get_object("raw", "w1")
            while response.read(1024 * 1024):
                pass
            response.close()
            response.release_conn()

        measure("read", read)
        measure("server-side copy", partial(client.copy_object, "raw", "copy", CopySource("raw", "w1")))
    for name, (mib_s, cpu_per_gib) in figures.items():
        print(f"{name}: {mib_s:.0f} MiB/s, store {cpu_per_gib:.1f} CPU-s/GiB")


def ingest(client: Minio, bucket: str, prefix: str, files: list[Path]) -> float:
    """Seconds to write every file as an object under `prefix`, one after another; the
    objects are removed afterwards (outside the time)."""
    keys = [f"{prefix}{secrets.token_hex(8)}-{path.name}" for path in files]

    def put(key: str, path: Path) -> None:
        with path.open("rb") as data:
            client.put_object(
                bucket, key, data, path.stat().st_size, part_size=PART_SIZE,
                num_parallel_uploads=PARALLEL_PARTS,
            )  # fmt: skip

    # The SDK looks the bucket's region up once per client: done here, outside the time, as
    # the long-running edge has done long before a push.
    client.put_object(bucket, f"{prefix}warm", io.BytesIO(b"warm"), 4)
    client.remove_object(bucket, f"{prefix}warm")
    started = time.perf_counter()
    for key, path in zip(keys, files, strict=True):
        put(key, path)
    seconds = time.perf_counter() - started
    for key in keys:
        client.remove_object(bucket, key)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.s3raw", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    write = sub.add_parser("ingest", help="time writing FILEs as the edge writes a push")
    write.add_argument("--endpoint", required=True)
    write.add_argument("--access-key", required=True)
    write.add_argument("--secret-key", required=True)
    write.add_argument("--bucket", required=True)
    write.add_argument("--prefix", default="bench-s3raw/")
    write.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command != "ingest":
        micro()
        return
    client = Minio(
        args.endpoint,
        access_key=args.access_key,
        secret_key=args.secret_key,
        secure=False,
        http_client=urllib3.PoolManager(maxsize=64),
    )
    print(json.dumps({"seconds": ingest(client, args.bucket, args.prefix, args.files)}))


if __name__ == "__main__":
    main()
