"""`seawall scrub`: re-hash every stored blob by hand, with a progress bar and a report."""

from __future__ import annotations

from pydantic import ByteSize, TypeAdapter, ValidationError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from services.running import s3_settings
from shared.registry.blobs import BlobStore
from shared.registry.storage import ObjectStore
from shared.scrub import count_blobs, scrub
from shared.settings import Settings


def parse_rate(rate: str | None, default: int) -> int:
    if rate is None:
        return default
    try:
        return int(TypeAdapter(ByteSize).validate_python(rate))
    except ValidationError:
        raise ValueError(f"invalid --rate {rate!r}: use e.g. 200MiB, 50MB or 0") from None


async def run_scrub(settings: Settings, rate: str | None, console: Console | None = None) -> int:
    """Scrub the bucket; 0 when every blob is sound, 2 when some were quarantined."""
    bytes_per_second = parse_rate(rate, int(settings.scrub.bytes_per_second))
    console = console or Console(stderr=True)
    store = ObjectStore(s3_settings(settings))
    try:
        blobs = BlobStore(store)
        total = await count_blobs(store)
        columns = (
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"scrubbing {total} blobs", total=None)
            report = await scrub(
                store,
                blobs,
                bytes_per_second=bytes_per_second,
                progress=lambda n: progress.advance(task, n),
            )
    finally:
        store.close()
    # Plain lines (no wrapping), so scripts can read the report.
    print(
        f"blobs {report.blobs}  bytes {report.bytes}  sound {report.ok}  "
        f"quarantined {len(report.corrupt)}  gone meanwhile {report.gone}  "
        f"seconds {report.seconds:.1f}"
    )
    for digest in report.corrupt:
        print(f"quarantined {digest}")
    return 2 if report.corrupt else 0
