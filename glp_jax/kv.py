"""tensorstore key-value stores for local paths and bucket URLs: one spelling everywhere.

Buckets take their endpoint and credentials from the standard environment variables, so a
user of real buckets sets nothing special and an S3-compatible store or an emulator needs
only its usual variable:
  s3://  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (custom endpoint), AWS_REGION /
         AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (else the default
         chain: profile, instance role)
  gs://  STORAGE_EMULATOR_HOST (an emulator; also TENSORSTORE_GCS_HTTP_URL),
         GOOGLE_APPLICATION_CREDENTIALS (else application default credentials)
tensorstore does not read AWS_ENDPOINT_URL nor STORAGE_EMULATOR_HOST itself: this module
passes them on (the s3 spec's `endpoint`, tensorstore's TENSORSTORE_GCS_HTTP_URL).
"""

from __future__ import annotations

import os

import tensorstore as ts

# memory:// stores live in a tensorstore Context; share one so re-opening in-process works.
_MEMORY_CONTEXT = ts.Context()


def s3_endpoint() -> str | None:
    """The custom S3 endpoint (boto's variables), None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def gcs_endpoint() -> str | None:
    """The GCS emulator's base URL from STORAGE_EMULATOR_HOST (the google clients' variable)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


_SET_BY_US: list[str] = []  # TENSORSTORE_GCS_HTTP_URL values this module set


def apply_endpoint_env() -> None:
    """Point tensorstore's gcs driver (ours and orbax's) at STORAGE_EMULATOR_HOST, unless
    the user set TENSORSTORE_GCS_HTTP_URL themselves."""
    endpoint = gcs_endpoint()
    current = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    if endpoint and (current is None or current in _SET_BY_US):
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint.rstrip("/")
        _SET_BY_US.append(endpoint.rstrip("/"))


def split_bucket_url(url: str) -> tuple[str, str, str]:
    """('s3' | 'gs' | other scheme, bucket, key prefix without slashes at the ends)."""
    scheme, rest = str(url).split("://", 1)
    bucket, _, path = rest.partition("/")
    return scheme, bucket, path.strip("/")


def s3_spec(url: str) -> dict:
    """The tensorstore s3 kvstore spec of an s3:// URL (a folder: trailing slash)."""
    _, bucket, path = split_bucket_url(url)
    spec: dict = {"driver": "s3", "bucket": bucket, "path": path + "/" if path else ""}
    if s3_endpoint():
        spec["endpoint"] = s3_endpoint()
    if s3_region():
        spec["aws_region"] = s3_region()
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # skip the profile chain (and its noise)
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def kvstore_spec(url: str) -> str | dict:
    """A tensorstore kvstore spec for a local path or URL, with a trailing slash."""
    url = str(url)
    if url.startswith(("s3://", "gs://")):
        from glp_jax.buckets import check_bucket  # imports this module

        check_bucket(url)
    if url.startswith("s3://"):
        return s3_spec(url)
    if "://" in url:
        apply_endpoint_env()
        return url.rstrip("/") + "/"
    return {"driver": "file", "path": os.path.abspath(url).rstrip("/") + "/"}


def child_spec(base: str | dict, name: str) -> str | dict:
    """The spec of folder `name` under `base`."""
    if isinstance(base, dict):
        return {**base, "path": base["path"] + name + "/"}
    return base + name + "/"


def context_for(url: str) -> ts.Context:
    """memory:// shares one context (so reopening sees the data); others cache nothing."""
    if str(url).startswith("memory://"):
        return _MEMORY_CONTEXT
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}})


def open_kvstore(url: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(url), context=context_for(url)).result()
