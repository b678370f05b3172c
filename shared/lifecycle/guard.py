"""The reference guard: online collection (GC, eviction) against concurrent pushes and fills.

A collection decides from a listing (its mark) which blobs nothing references; by the
time it deletes one, a push may have made it referenced again without writing it (the
blob was "already there": an upload finish, a mount, a manifest PUT naming it). Redis
coordinates the two sides, Dekker style: each side writes its mark, then reads the
other's, in one atomic script, so at least one of them sees the other.

- A write that makes digests referenced first calls `claim(digests)`: ZADD
  `seawall:gc:claimed` digest -> now, then read `seawall:gc:condemned` (digest -> "run
  time") and `seawall:gc:deleted` (digest -> time, kept a day). It returns the digests
  found condemned or recently deleted; the caller forgets what it cached about them and
  checks the bucket again (a blob gone is uploaded again, or the manifest PUT is refused
  with MANIFEST_BLOB_UNKNOWN). While one is condemned (its deletion under way) claim
  waits, polling, for at most CLAIM_PATIENCE_SECONDS (then UNAVAILABLE).
- A collection passes each batch of candidates to `condemn(run_id, digests, since)`:
  HSET condemned, then read the claims; a digest claimed at or after `since` (the run's
  start minus gc_grace) is dropped from condemned and not returned. It deletes what is
  returned, then calls `deleted(run_id, digests)` (HDEL condemned, ZADD deleted), and
  `release(run_id)` in a finally. Anything it deletes on the strength of its mark (a
  blob's record and data, a layer link, a project entry) goes through these three calls.

The interleavings, for a digest D that a collection's mark found unreferenced:
1. claim, then condemn: condemn finds the claim and keeps D.
2. condemn, then claim: claim finds D condemned and waits until `deleted` (D is gone: the
   writer re-checks, finds nothing, uploads again or refuses the manifest) or until the
   run drops it (D stays: the re-check finds it).
3. a claim older than `since` does not protect D: the write it announced finished more
   than gc_grace before the run started, so the mark saw its reference (links, revisions).
4. the collection killed between condemn and deleted: its entries name the lifecycle
   lease's holder, and once that lease lapses (LEASE_TTL_SECONDS, less than a claim's
   patience) claims and later runs treat them as abandoned: the digest is returned for a
   re-check, which finds whatever the killed run left. Entries older than
   STALE_CONDEMNED_SECONDS are abandoned whatever the lease says.
5. Redis flushed during a run: the claims are lost with the lifecycle lease; `condemn`
   refuses to run without that lease (ClaimsLost), so nothing is deleted on the strength
   of a claim record that lost entries. Pushes never fail because Redis is away: claim
   then returns nothing (a collection cannot run without Redis anyway).
6. a deletion older than the day `deleted` reports it, while some process still remembers
   where the blob was: `RepositoryStore.claim` drops the remembered placements of
   everything claimed, so a write's checks always ask the bucket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared.lifecycle.runs import LIFECYCLE_LEASE
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError

log = structlog.get_logger("guard")

CLAIMED = "seawall:gc:claimed"
CONDEMNED = "seawall:gc:condemned"
DELETED = "seawall:gc:deleted"
# A deletion that outlived this was abandoned by a killed run (a live run deletes a batch
# in seconds, and stops between batches once it loses the lifecycle lease).
STALE_CONDEMNED_SECONDS = 600.0
# Deletions are reported to claims for this long, so a process that cached a blob's
# placement before it was deleted does not trust it.
DELETED_KEPT_SECONDS = 86_400.0
CLAIM_POLL_SECONDS = 0.05
CLAIM_PATIENCE_SECONDS = 30.0

# KEYS: claimed, condemned, deleted, lifecycle lease. ARGV: record (1: add the claims), now, stale_before,
# deleted_since, digests... Returns {waiting (0/1), found digests...}.
_CLAIM = """
local now, stale, recent = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[1] == '1' then
  for i = 5, #ARGV do redis.call('zadd', KEYS[1], now, ARGV[i]) end
end
local holder = redis.call('get', KEYS[4])
local out = {0}
for i = 5, #ARGV do
  local d = ARGV[i]
  local mark = redis.call('hget', KEYS[2], d)
  if mark then
    local _, at, by = string.match(mark, '^(%S+) (%S+) ?(%S*)$')
    at = tonumber(at) or 0
    -- Live only while the run that wrote it still holds the lifecycle lease.
    if at < stale or not holder or by ~= holder then redis.call('hdel', KEYS[2], d) else out[1] = 1 end
    table.insert(out, d)
  else
    local gone = redis.call('zscore', KEYS[3], d)
    if gone and tonumber(gone) >= recent then table.insert(out, d) end
  end
end
return out
"""

# KEYS: condemned, claimed, lease. ARGV: run, now, since, trim_before, stale_before, digests...
_CONDEMN = """
local holder = redis.call('get', KEYS[3])
if not holder then
  return redis.error_reply('CLAIMSLOST the lifecycle lease is gone (Redis flushed or the lease expired)')
end
local run, now, since = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('zremrangebyscore', KEYS[2], '-inf', '(' .. ARGV[4])
for i = 6, #ARGV do redis.call('hset', KEYS[1], ARGV[i], run .. ' ' .. now .. ' ' .. holder) end
local safe = {}
for i = 6, #ARGV do
  local d = ARGV[i]
  local claimed = redis.call('zscore', KEYS[2], d)
  if claimed and tonumber(claimed) >= since then
    redis.call('hdel', KEYS[1], d)
  else
    table.insert(safe, d)
  end
end
local stale = tonumber(ARGV[5])
local marks = redis.call('hgetall', KEYS[1])
for i = 1, #marks, 2 do
  local owner, at, by = string.match(marks[i + 1], '^(%S+) (%S+) ?(%S*)$')
  -- Another run's marks are abandoned once it no longer holds the lease (this run does).
  if owner ~= run and ((tonumber(at) or 0) < stale or by ~= holder) then
    redis.call('hdel', KEYS[1], marks[i])
  end
end
return safe
"""

# KEYS: condemned, deleted. ARGV: run, now, trim_before, digests...
_DELETED = """
for i = 4, #ARGV do
  local mark = redis.call('hget', KEYS[1], ARGV[i])
  if mark and string.sub(mark, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
    redis.call('hdel', KEYS[1], ARGV[i])
  end
  redis.call('zadd', KEYS[2], ARGV[2], ARGV[i])
end
redis.call('zremrangebyscore', KEYS[2], '-inf', '(' .. ARGV[3])
return 1
"""

# KEYS: condemned. ARGV: run.
_RELEASE = """
local marks = redis.call('hgetall', KEYS[1])
local dropped = 0
for i = 1, #marks, 2 do
  if string.sub(marks[i + 1], 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
    redis.call('hdel', KEYS[1], marks[i])
    dropped = dropped + 1
  end
end
return dropped
"""

# KEYS: claimed. ARGV: since, digests...
_RECENTLY_CLAIMED = """
local out = {}
for i = 2, #ARGV do
  local at = redis.call('zscore', KEYS[1], ARGV[i])
  if at and tonumber(at) >= tonumber(ARGV[1]) then table.insert(out, ARGV[i]) end
end
return out
"""


class ClaimsLost(RuntimeError):
    """The lifecycle lease is gone from Redis (flushed, or expired): the record of claims may
    have lost entries too, so nothing may be condemned on its strength. Stop the run."""


def _digests(raw: Iterable[bytes | str]) -> set[Digest]:
    return {Digest.parse(d.decode() if isinstance(d, bytes) else d) for d in raw}


class ReferenceGuard:
    """Both sides of the protocol in the module docstring; each call is one script."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._condemn = redis.register_script(_CONDEMN)
        self._deleted = redis.register_script(_DELETED)
        self._release = redis.register_script(_RELEASE)
        self._recently_claimed = redis.register_script(_RECENTLY_CLAIMED)

    async def claim(self, digests: Iterable[Digest]) -> set[Digest]:
        """Announce that a write is about to make `digests` referenced; call it before the
        existence checks that let the write skip work. Returns the digests a collection
        condemned or deleted lately: forget what is cached about them and look again.
        Waits while one is being deleted; UNAVAILABLE if that lasts CLAIM_PATIENCE_SECONDS.
        Redis away: returns an empty set (a push does not fail for want of Redis)."""
        wanted = sorted({str(d) for d in digests})
        if not wanted:
            return set()
        deadline = time.monotonic() + CLAIM_PATIENCE_SECONDS
        record = True
        found: set[Digest] = set()
        while True:
            now = time.time()
            args = ["1" if record else "0", now, now - STALE_CONDEMNED_SECONDS, now - DELETED_KEPT_SECONDS]
            try:
                reply = await self._claim(
                    keys=[CLAIMED, CONDEMNED, DELETED, LIFECYCLE_LEASE], args=[*args, *wanted]
                )
            except RedisError as exc:
                if record:
                    log.warning("claim_not_recorded", reason=str(exc), digests=len(wanted))
                # Whatever was seen condemned is still to be checked again by the caller.
                return found
            record = False
            found |= _digests(reply[1:])
            if not int(reply[0]):
                return found
            if time.monotonic() > deadline:
                raise RegistryError(
                    "UNAVAILABLE",
                    "a blob this request needs is being deleted by garbage collection; try again",
                    detail={"digests": sorted(str(d) for d in found)[:10]},
                )
            await asyncio.sleep(CLAIM_POLL_SECONDS)

    async def condemn(self, run_id: str, digests: Iterable[Digest], since: float) -> set[Digest]:
        """Mark `digests` as being deleted by run `run_id`; returns those nobody claimed at or
        after `since`: only these may be deleted (then `deleted`). Claims older than twice
        the grace (`since` counted back again from now) are trimmed. Raises ClaimsLost
        without the lifecycle lease in Redis: call it under `runs.exclusive()`."""
        wanted = sorted({str(d) for d in digests})
        if not wanted:
            return set()
        now = time.time()
        trim_before = since - max(now - since, 0.0)
        args: list[str | float] = [run_id, now, since, trim_before, now - STALE_CONDEMNED_SECONDS]
        try:
            reply = await self._condemn(keys=[CONDEMNED, CLAIMED, LIFECYCLE_LEASE], args=[*args, *wanted])
        except ResponseError as exc:
            if "CLAIMSLOST" in str(exc):
                raise ClaimsLost(str(exc).split(" ", 1)[-1]) from None
            raise
        return _digests(reply)

    async def deleted(self, run_id: str, digests: Iterable[Digest]) -> None:
        """Record that run `run_id` deleted `digests` (claims report them for a day)."""
        wanted = sorted({str(d) for d in digests})
        if not wanted:
            return
        now = time.time()
        args: list[str | float] = [run_id, now, now - DELETED_KEPT_SECONDS]
        await self._deleted(keys=[CONDEMNED, DELETED], args=[*args, *wanted])

    async def release(self, run_id: str) -> int:
        """Drop what run `run_id` left condemned (a run's finally); returns how many."""
        return int(await self._release(keys=[CONDEMNED], args=[run_id]))

    async def recently_claimed(self, digests: Iterable[Digest], since: float) -> set[Digest]:
        """Which of `digests` were claimed at or after `since` (no marks written)."""
        wanted = sorted({str(d) for d in digests})
        if not wanted:
            return set()
        return _digests(await self._recently_claimed(keys=[CLAIMED], args=[since, *wanted]))
