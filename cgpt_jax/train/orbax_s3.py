"""Teach Orbax to write arrays to s3:// through TensorStore's own `s3` driver.

Orbax 0.12.8 hands gs:// array paths to TensorStore's `gcs` driver, but turns an s3:// path into a local
file path (`tensorstore_utils._normalize_path` collapses 's3://' to 's3:/'), so its array writes fail while
its JSON and metadata writes (etils.epath, fsspec) already reach the bucket. `enable()` routes s3:// array
paths to TensorStore's `s3` kvstore, with the endpoint and region of the AWS SDK's environment variables
(TensorStore does not read AWS_ENDPOINT_URL itself). It wraps three private Orbax functions: it does
nothing once Orbax handles s3:// on its own, and an Orbax that renamed them fails when the first s3://
checkpoint directory is opened, with an AttributeError naming the function, rather than writing elsewhere.
"""
from __future__ import annotations

import os
from typing import Any

from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

_PREFIX = "s3://"


def _s3_kvstore(location: str) -> dict[str, Any]:
    bucket, _, key = location[len(_PREFIX):].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        spec["endpoint"] = endpoint
    if region:
        spec["aws_region"] = region
    return spec


def orbax_handles_s3() -> bool:
    return tensorstore_utils._use_gcs_driver(tensorstore_utils._normalize_path(_PREFIX + "b/k"))


def enable() -> None:
    """Idempotent; call before the first Orbax save or restore of an s3:// path."""
    if getattr(tensorstore_utils, "_cgpt_jax_s3", False) or orbax_handles_s3():
        return
    normalize, use_cloud_driver = tensorstore_utils._normalize_path, tensorstore_utils._use_gcs_driver
    gcs_kvstore = gcs_utils.get_kvstore_for_gcs

    def _normalize_path(location: str) -> str:
        location = str(location)
        return _PREFIX + normalize(location[len(_PREFIX):]) if location.startswith(_PREFIX) else normalize(location)

    def _use_gcs_driver(directory: str) -> bool:  # "a cloud driver", in Orbax's code path
        return directory.startswith(_PREFIX) or use_cloud_driver(directory)

    def get_kvstore_for_gcs(location: str) -> dict[str, Any]:
        return _s3_kvstore(location) if location.startswith(_PREFIX) else gcs_kvstore(location)

    tensorstore_utils._normalize_path = _normalize_path
    tensorstore_utils._use_gcs_driver = _use_gcs_driver
    gcs_utils.get_kvstore_for_gcs = get_kvstore_for_gcs
    tensorstore_utils._cgpt_jax_s3 = True
