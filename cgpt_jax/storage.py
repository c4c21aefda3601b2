"""Where files live: one path type (etils.epath) for local directories, gs:// and s3:// buckets.

Every file the product reads or writes goes through `path(...)`, so a run directory, a sweep, a data store
or an export can sit on a local disk, a shared filesystem or an object store. Object stores are reached
through fsspec (gcsfs, s3fs: the `cloud` extra); credentials come from the usual places of each cloud's
own SDK (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws, and AWS_ENDPOINT_URL for an
S3-compatible store; for GCS: Application Default Credentials).

Consistency when a process is killed mid-write: on a local disk `write_atomically` writes a temporary file
and renames it over the target; an object store has no rename, but it makes one upload visible whole or not
at all, so the object is written in one upload and a reader sees the old or the new version, never a
truncated one. `move` (moving a run aside, rejecting a damaged checkpoint) is a copy then a delete on an
object store: a kill in between leaves both copies, never neither.
"""
from __future__ import annotations

import importlib.util
import io
import os
import uuid
from typing import Any

import fsspec
from etils import epath

from cgpt_jax.errors import InputError

Path = epath.Path
# scheme → the fsspec package that serves it
REMOTE_SCHEMES = {"gs": "gcsfs", "s3": "s3fs"}
# Several processes write one directory (a sweep's trainers, a run's hosts, a resumed run): a listing cached by
# one process would hide the files the others wrote after it, so no process caches bucket listings.
for _protocol in ("s3", "gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False
CLOUD_INSTALL = "pip install 'cgpt_jax[cloud]'"


def scheme(location: str | os.PathLike) -> str:
    """'gs', 's3', or '' for a local path."""
    text = os.fspath(location)
    return text.split("://", 1)[0] if "://" in text else ""


def is_remote(location: str | os.PathLike) -> bool:
    return scheme(location) != ""


def check_scheme(location: str, what: str = "path") -> None:
    """Refuse a URL whose scheme no installed filesystem serves (before anything is written to a wrong place)."""
    name = scheme(location)
    if not name:
        return
    if name not in REMOTE_SCHEMES:
        raise InputError(f"{what} {location}: no filesystem for '{name}://' — use a local path, gs://BUCKET/... "
                         f"or s3://BUCKET/...")
    if importlib.util.find_spec(REMOTE_SCHEMES[name]) is None:
        raise InputError(f"{what} {location}: '{name}://' needs the {REMOTE_SCHEMES[name]} package, which is not "
                         f"installed — {CLOUD_INSTALL}")


def path(location: str | os.PathLike, *parts: str) -> Path:
    """`location` (a local path, gs://... or s3://...) joined with `parts`; a local path is made absolute
    (Orbax takes absolute paths only) with `~` expanded."""
    text = os.fspath(location)
    check_scheme(text)
    if not is_remote(text):
        text = os.path.abspath(os.path.expanduser(text))
    return epath.Path(text).joinpath(*parts)


def write_atomically(target: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` so that a reader (or a process killed mid-write) never sees a truncated file."""
    target = path(target)
    if is_remote(target):
        target.write_bytes(data.encode() if isinstance(data, str) else data)  # one upload: all or nothing
        return
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, target)


def write_figure(figure: Any, target: str | os.PathLike, dpi: int) -> None:
    """Save a matplotlib figure as PNG: rendered in memory, then written in one piece (local, gs:// or s3://)."""
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=dpi)
    write_atomically(target, image.getvalue())


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a file or directory (on an object store: copy every object, then delete the source)."""
    source, target = path(source), path(target)
    if is_remote(source):
        fs = epath.backend.fsspec_backend.fs(os.fspath(source))
        fs.copy(os.fspath(source), os.fspath(target), recursive=True)
        fs.rm(os.fspath(source), recursive=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def check_workdir(location: str, flag: str = "--workdir") -> None:
    """Fail before any work when `location` cannot be written: an unknown scheme, a missing filesystem
    package, a bucket that does not exist, missing or wrong credentials. On an object store a probe object
    is written, read back and deleted; local directories are checked by the caller (free space, rights)."""
    check_scheme(location, flag)
    if not is_remote(location):
        return
    bucket = os.fspath(location).split("://", 1)[1].split("/", 1)[0]
    probe = path(location, f".cgpt_jax-probe-{uuid.uuid4().hex}")
    try:
        probe.write_text("probe")
        ok = probe.read_text() == "probe"
        probe.unlink()
    except FileNotFoundError as e:
        raise InputError(f"{flag}={location}: bucket {bucket} does not exist or cannot be seen with these "
                         f"credentials ({_short(e)}) — create it, or fix the bucket name") from None
    except PermissionError as e:
        raise InputError(f"{flag}={location}: access denied ({_short(e)}) — check the credentials "
                         f"({_CREDENTIALS[scheme(location)]}) and that they may write to {bucket}") from None
    except Exception as e:  # the SDKs raise their own types for missing credentials, DNS and TLS errors
        raise InputError(f"{flag}={location}: cannot write to the bucket ({type(e).__name__}: {_short(e)}) — "
                         f"check the credentials ({_CREDENTIALS[scheme(location)]}) and the endpoint") from None
    if not ok:
        raise InputError(f"{flag}={location}: a probe object read back different bytes — check the store")


_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials; AWS_ENDPOINT_URL "
          "for an S3-compatible store",
    "gs": "gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS",
}


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
