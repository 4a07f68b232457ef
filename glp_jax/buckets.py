"""One quick look at a bucket before the first use, so a wrong endpoint, missing
credentials or a missing bucket is one clear line instead of a long retry loop (tensorstore
retries an unreachable endpoint for minutes) or a silent "nothing here" (tensorstore reads a
missing S3 bucket as missing keys).

The look uses the standard clients with the standard variables (boto3 for s3://,
google-cloud-storage for gs://), bounded in time, once per bucket and process.
`GLP_BUCKET_CHECK=0` skips it (e.g. credentials that may write but not read bucket metadata).
"""

from __future__ import annotations

import functools
import os

from glp_jax.errors import GLPError
from glp_jax.kv import gcs_endpoint, s3_endpoint, s3_region, split_bucket_url

TIMEOUT_S = 10


class BucketError(GLPError):
    """A bucket cannot be used: unreachable, no credentials, or missing."""


def check_bucket(url: str) -> None:
    """Raise BucketError naming the problem and the fix if `url`'s bucket is unusable."""
    if os.environ.get("GLP_BUCKET_CHECK", "1") == "0" or "://" not in str(url):
        return
    scheme, bucket, _ = split_bucket_url(str(url))
    if scheme == "s3":
        _checked_s3(bucket, s3_endpoint(), s3_region())
    elif scheme == "gs":
        _checked_gcs(bucket, gcs_endpoint())


@functools.lru_cache(maxsize=64)
def _checked_s3(bucket: str, endpoint: str | None, region: str | None) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions as bx

    where = endpoint or "AWS S3"
    cfg = botocore.config.Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S,
                                 retries={"max_attempts": 1})
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name=region or "us-east-1",
                     config=cfg).head_bucket(Bucket=bucket)
    except bx.NoCredentialsError:
        raise BucketError(f"s3://{bucket}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                          f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or use an instance role)") from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as e:
        raise BucketError(f"s3://{bucket}: cannot reach {where} ({e.__class__.__name__}); check "
                          f"the network and AWS_ENDPOINT_URL") from None
    except bx.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise BucketError(f"s3://{bucket}: the bucket does not exist at {where}; create it, or "
                              f"fix the bucket name (or AWS_ENDPOINT_URL)") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise BucketError(f"s3://{bucket}: access denied at {where}; check the credentials "
                              f"(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy (or set "
                              f"GLP_BUCKET_CHECK=0 if they may use objects but not list the "
                              f"bucket)") from None
        raise BucketError(f"s3://{bucket}: {where} answered {code or e}; check the bucket "
                          f"and AWS_ENDPOINT_URL / AWS_REGION") from None


@functools.lru_cache(maxsize=64)
def _checked_gcs(bucket: str, endpoint: str | None) -> None:
    import google.api_core.exceptions as gx
    import google.auth.exceptions
    import requests
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    where = endpoint or "Google Cloud Storage"
    try:
        if endpoint:  # an emulator: no credentials
            client = storage.Client(project="emulator", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": endpoint})
        else:
            client = storage.Client()
        found = client.lookup_bucket(bucket, timeout=TIMEOUT_S, retry=None)
    except google.auth.exceptions.DefaultCredentialsError:
        raise BucketError(f"gs://{bucket}: no Google credentials found; set "
                          f"GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth "
                          f"application-default login`") from None
    except (requests.ConnectionError, requests.Timeout) as e:
        raise BucketError(f"gs://{bucket}: cannot reach {where} ({e.__class__.__name__}); check "
                          f"the network (and STORAGE_EMULATOR_HOST if you use an emulator)") from None
    except gx.Forbidden:
        raise BucketError(f"gs://{bucket}: access denied; check the credentials "
                          f"(GOOGLE_APPLICATION_CREDENTIALS) and the bucket's IAM (or set "
                          f"GLP_BUCKET_CHECK=0 if they may use objects but not read the "
                          f"bucket's metadata)") from None
    except gx.GoogleAPIError as e:
        raise BucketError(f"gs://{bucket}: {where} answered {str(e)[:200]}") from None
    if found is None:
        raise BucketError(f"gs://{bucket}: the bucket does not exist at {where}; create it, or "
                          f"fix the bucket name (or STORAGE_EMULATOR_HOST)")
