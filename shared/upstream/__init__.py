"""The upstream registry client: the only package (with shared.registry.storage) that talks to the outside.

One `UpstreamClient` per configured upstream owns one aiohttp session. It speaks the
distribution API for what a pull-through cache needs (manifest HEAD/GET, blob GET with
Range), does the registry auth dance (Bearer tokens from the challenge's realm, or Basic),
reads Docker Hub's pull-quota headers and classifies every failure into one exception,
`UpstreamFailure`, which maps onto an OCI error. `aiohttp.ClientError` never escapes.

The client is a facade over one module per seam: `transport` (session, timeouts, redirects,
the governor), `auth` (challenges, token cache, tokens shared through Redis), `failures`
(classification), `manifests`, `blobs` and `blobstream`; `headers` parses what responses say.

Docker Hub specifics handled here:

* a manifest GET is a pull and spends quota; HEAD and blob GETs are free. Responses carry
  `ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600` and
  `docker-ratelimit-source`; each one corrects the governor's bucket (when the client has
  a governor) and comes back with the manifest or the failure.
* over the quota: 429 with a JSON TOOMANYREQUESTS envelope (kind "quota"); the abuse limiter
  answers a plain-text 429 (kind "abuse"). A 429 is never retried here.
* blobs are redirected to a CDN: redirects are followed by hand so that Authorization is
  dropped whenever the origin changes.
"""

from shared.upstream.blobstream import BlobStream
from shared.upstream.client import UpstreamClient
from shared.upstream.failures import UpstreamFailure
from shared.upstream.headers import RateLimit, parse_challenges, parse_retry_after
from shared.upstream.manifests import FetchedManifest, ManifestHead

__all__ = [
    "BlobStream",
    "FetchedManifest",
    "ManifestHead",
    "RateLimit",
    "UpstreamClient",
    "UpstreamFailure",
    "parse_challenges",
    "parse_retry_after",
]
