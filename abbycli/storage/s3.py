"""S3BlobStore: the images in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, R2...).

Selected by ``storage.blobs_url = "s3://bucket/prefix"``. The client is obstore (Rust's
``object_store``): about 25 ms to import where boto3 with a client takes about 300 ms, and it
has what the write order needs, a create-only PUT (``If-None-Match: *``), plus streaming
listings, multi-object deletes and presigned URLs. It is an optional extra
(``pip install 'abbycli[s3]'``) and is imported only when an S3 store is built, never by
``import abbycli``.

Write order, as for the local store, so no ledger row ever points at a missing object:
``stage`` keeps the bytes and sends nothing; ``commit``, inside the ledger transaction, PUTs
them under their final key and refuses to replace an object that exists. If the row then
fails to commit, the caller deletes the object again. Deletes go the other way: row first,
then the object; an object that cannot be deleted stays queued for the next cleanup.

Secrets (the secret access key, the session token) never reach a repr, a message or a log:
messages are built here from the error's kind, never by passing the client's text through.
"""

from __future__ import annotations

import io
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, BinaryIO, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

from ..errors import ConfigError, InvalidInput, NotFound, StorageError
from ..secrets import redact
from .formats import sniff_format
from .safefs import DELETED, FAILED, MISSING, UNSAFE

from .blobs import BlobExists, BlobInfo, BlobStore, Staged

log = logging.getLogger("abby")

# One abby setting each, and the AWS variables that set it, the first one set winning. As for
# every abby key, the environment beats the config file.
S3_SETTINGS: dict[str, tuple[str, ...]] = {
    "storage.s3_endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "storage.s3_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "storage.s3_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "storage.s3_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "storage.s3_session_token": ("AWS_SESSION_TOKEN",),
}
SECRET_SETTINGS = frozenset({"storage.s3_secret_access_key", "storage.s3_session_token"})

DELETE_BATCH = 1000  # the most keys one S3 DeleteObjects request takes
LIST_CHUNK = 500  # objects handed over per step of a listing; pages are fetched as they are read
MAX_URL_LIFETIME = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week

# Fail within seconds when the store is down: a bot's save must not hang for obstore's
# default three minutes of retries. A PUT runs inside the ledger's write transaction, which
# every host's writers wait for, so an endpoint that accepts and never answers must not hold
# it long either: a 1.5 MiB image takes milliseconds to upload to a healthy store.
_CLIENT_OPTIONS = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=15)}
_RETRY = {"max_retries": 2, "retry_timeout": timedelta(seconds=10),
          "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)}}

_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,62}")
_STATUS = re.compile(r"status code: (\d{3}[A-Za-z ]*)")
_S3_CODE = re.compile(r"<Code>([A-Za-z.]+)</Code>")
_UNREACHABLE = re.compile(r"error sending request|timed out|connection (refused|reset|closed)|dns error",
                          re.IGNORECASE)


@dataclass(frozen=True)
class S3Options:
    """Where and how to reach the S3 service. The secrets are kept out of the repr."""

    endpoint: str | None = None  # None: AWS itself
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def resolve_s3_options(settings: Mapping[str, Any] | None = None,
                       env: Mapping[str, str] | None = None) -> S3Options:
    """The S3 options from the AWS environment variables, else the ``storage.s3_*`` settings.

    ``settings`` maps the dotted names of ``S3_SETTINGS`` to values (missing or None: unset).
    ConfigError names the variable or key at fault, never a secret's value.
    """
    import os

    settings = settings or {}
    env = os.environ if env is None else env
    values: dict[str, str | None] = {}
    origin: dict[str, str] = {}
    for name, variables in S3_SETTINGS.items():
        values[name], origin[name] = None, name
        for var in variables:
            if env.get(var, "").strip():
                values[name], origin[name] = env[var].strip(), var
                break
        else:
            value = settings.get(name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string")
            if value and value.strip():
                values[name] = value.strip()

    endpoint = values["storage.s3_endpoint"]
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{origin['storage.s3_endpoint']}: the S3 endpoint must be an http:// or "
                              f"https:// URL such as https://s3.example.com")
        if "@" in parts.netloc:
            raise ConfigError(f"{origin['storage.s3_endpoint']}: the S3 endpoint must not carry credentials; "
                              f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
        endpoint = endpoint.rstrip("/")
    key_id, secret = values["storage.s3_access_key_id"], values["storage.s3_secret_access_key"]
    # Without keys obstore would go looking for instance credentials (a metadata service on
    # the network); abby wants them said.
    if not key_id or not secret:
        missing = "AWS_ACCESS_KEY_ID" if not key_id else "AWS_SECRET_ACCESS_KEY"
        setting = "storage.s3_access_key_id" if not key_id else "storage.s3_secret_access_key"
        raise ConfigError(f"the S3 image store needs credentials: set {missing} (or {setting})")
    return S3Options(endpoint=endpoint, region=values["storage.s3_region"] or "us-east-1",
                     access_key_id=key_id, secret_access_key=secret,
                     session_token=values["storage.s3_session_token"])


def parse_blobs_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix``; ConfigError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"storage.blobs_url {url!r} is not an s3://bucket/prefix URL")
    if not _BUCKET.fullmatch(parts.netloc):
        raise ConfigError(f"storage.blobs_url: {parts.netloc!r} is not a valid bucket name "
                          f"(3-63 lowercase letters, digits, dots, hyphens)")
    if parts.query or parts.fragment:
        raise ConfigError(f"storage.blobs_url {url!r}: no ?query or #fragment allowed")
    prefix = parts.path.strip("/")
    if prefix and not _safe_key(prefix):
        raise ConfigError(f"storage.blobs_url {url!r}: the prefix must be plain '/'-separated names")
    return parts.netloc, prefix


def _safe_key(key: str) -> bool:
    """A relative '/'-separated key: no leading '/', no empty, '.' or '..' part, no backslash."""
    return (isinstance(key, str) and bool(key) and "\\" not in key and "\0" not in key
            and all(part not in ("", ".", "..") for part in key.split("/")))


def _import_obstore():
    try:
        import obstore
        import obstore.exceptions
        import obstore.store
    except ImportError:
        raise ConfigError("the S3 image store needs the obstore package: pip install 'abbycli[s3]'") from None
    return obstore


class S3BlobStore(BlobStore):
    """Images as objects under ``s3://bucket/prefix/<key>``."""

    name = "s3"

    def __init__(self, bucket: str, prefix: str, options: S3Options):
        self._ob = _import_obstore()
        self.bucket, self.prefix, self.options = bucket, prefix, options
        self._warned_token = False
        self.endpoint = options.endpoint or f"https://s3.{options.region}.amazonaws.com"
        self._secrets = (options.secret_access_key, options.session_token)
        config = {"region": options.region, "access_key_id": options.access_key_id,
                  "secret_access_key": options.secret_access_key}
        if options.endpoint:
            config["endpoint"] = options.endpoint
        if options.session_token:
            config["session_token"] = options.session_token
        client = dict(_CLIENT_OPTIONS, allow_http=self.endpoint.startswith("http://"))
        try:
            self._store = self._ob.store.S3Store(bucket, prefix=prefix or None, config=config,
                                                 client_options=client, retry_config=_RETRY)
        except Exception as exc:  # obstore raises several types for a bad configuration
            raise ConfigError(f"{self.describe()}: cannot set up the S3 client "
                              f"({redact(str(exc).splitlines()[0], *self._secrets)})") from None

    @classmethod
    def from_url(cls, url: str, options: S3Options | None = None) -> S3BlobStore:
        """The store for ``s3://bucket/prefix``; options default to the environment's."""
        bucket, prefix = parse_blobs_url(url)
        return cls(bucket, prefix, options if options is not None else resolve_s3_options())

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3BlobStore({self.describe()!r}, endpoint={self.endpoint!r})"

    # --- errors

    @contextmanager
    def _errors(self, doing: str, key: str) -> Iterator[None]:
        """Every client error leaves as BlobExists, NotFound or StorageError, in one line."""
        exc_types = self._ob.exceptions
        try:
            yield
        except (exc_types.AlreadyExistsError, exc_types.PreconditionError):
            raise BlobExists(f"{self.describe()}: {key} already exists; it was left as it was") from None
        except (exc_types.NotFoundError, FileNotFoundError):
            raise NotFound(f"{self.describe()}: no object {key}") from None
        except Exception as exc:
            raise StorageError(f"{self.describe()}: cannot {doing} {key}: {self._reason(exc)}") from None

    def _reason(self, exc: Exception) -> str:
        """The cause in a few words, built from the error: obstore's own text runs over many
        lines with the server's whole XML answer."""
        text = redact(str(exc), *self._secrets)
        status, code = _STATUS.search(text), _S3_CODE.search(text)
        code_text = f" ({code.group(1)})" if code else ""
        exc_types = self._ob.exceptions
        if isinstance(exc, (exc_types.PermissionDeniedError, exc_types.UnauthenticatedError)) or (
                status and status.group(1)[:3] in ("401", "403")):
            return f"access denied{code_text}; check the S3 credentials and the bucket's permissions"
        if status:
            return f"the server answered {status.group(1).strip()}{code_text}"
        if _UNREACHABLE.search(text):
            return f"cannot reach the S3 endpoint {self.endpoint}"
        first = text.splitlines()[0] if text else ""
        return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__

    def _store_wide(self, exc: Exception) -> bool:
        return self._reason(exc).startswith(("access denied", "cannot reach"))

    def _check_key(self, key: str) -> str:
        if not _safe_key(key):
            raise StorageError(f"{self.describe()}: refusing the unsafe key {key!r}")
        return key

    # --- writing

    def stage(self, data: bytes) -> Staged:
        """Nothing to send before the transaction: the PUT in commit() is atomic by itself."""
        return Staged(len(data), data=bytes(data))

    def commit(self, staged: Staged, key: str) -> None:
        self._check_key(key)
        if staged.data is None:
            raise StorageError(f"{self.describe()}: {key}: the staged image was already discarded")
        fmt = sniff_format(staged.data[:16])
        attributes = {"Content-Type": f"image/{fmt}"} if fmt else None  # so a presigned URL shows it
        with self._errors("write", key):
            self._ob.put(self._store, key, staged.data, mode="create", attributes=attributes)

    def discard(self, staged: Staged) -> None:
        staged.data = None

    def delete(self, keys: Sequence[str]) -> dict[str, str]:
        """Outcome per key, a DeleteObjects request per batch. S3 reports a missing key as
        deleted, so MISSING only shows when a batch fails and its keys are retried one by one."""
        outcome: dict[str, str] = {}
        safe = []
        for key in keys:
            if _safe_key(key):
                safe.append(key)
            else:
                outcome[key] = UNSAFE
        for start in range(0, len(safe), DELETE_BATCH):
            batch = safe[start:start + DELETE_BATCH]
            try:
                self._ob.delete(self._store, batch)
            except Exception as exc:
                self._delete_each(batch, exc, outcome)
            else:
                outcome.update(dict.fromkeys(batch, DELETED))
        return outcome

    def _delete_each(self, batch: list[str], batch_error: Exception, outcome: dict[str, str]) -> None:
        """After a failed batch: which keys fail, unless the whole store refused (down, or
        the credentials are wrong), where a request per key would only fail the same way."""
        if self._store_wide(batch_error):
            log.warning("%s: cannot delete %d objects: %s", self.describe(), len(batch), self._reason(batch_error))
            outcome.update(dict.fromkeys(batch, FAILED))
            return
        for key in batch:
            try:
                with self._errors("delete", key):
                    self._ob.delete(self._store, key)
            except NotFound:
                outcome[key] = MISSING
            except StorageError as exc:
                log.warning("%s", exc)
                outcome[key] = FAILED
            else:
                outcome[key] = DELETED

    # --- reading

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every object under ``prefix`` (whole '/'-separated names), page by page as read."""
        prefix = prefix.strip("/")
        if prefix:
            self._check_key(prefix)
        with self._errors("list", prefix or "the objects"):
            stream = iter(self._ob.list(self._store, prefix=prefix or None, chunk_size=LIST_CHUNK))
        while True:
            with self._errors("list", prefix or "the objects"):
                chunk = next(stream, None)
            if chunk is None:
                return
            for meta in chunk:
                yield BlobInfo(meta["path"], meta["size"], meta["last_modified"].timestamp())

    def stat(self, key: str) -> BlobInfo | None:
        try:
            with self._errors("look up", self._check_key(key)):
                meta = self._ob.head(self._store, key)
        except NotFound:
            return None
        return BlobInfo(key, meta["size"], meta["last_modified"].timestamp())

    def read(self, key: str) -> bytes:
        with self._errors("read", self._check_key(key)):
            return bytes(self._ob.get(self._store, key).bytes())

    def open(self, key: str) -> BinaryIO:
        """The whole object in memory: images are small, and a seekable file is what
        discord.File and Pillow want."""
        return io.BytesIO(self.read(key))

    def local_path(self, key: str) -> None:
        return None

    def url(self, key: str, expires: float) -> str:
        """A presigned GET URL, valid for ``expires`` seconds. Signing is local: no request."""
        if not 1 <= expires <= MAX_URL_LIFETIME:
            raise InvalidInput(f"a presigned URL lives from 1 s to {MAX_URL_LIFETIME} s (7 days), not {expires!r}")
        if self.options.session_token and not self._warned_token:
            # SigV4 cannot sign with temporary credentials without putting their token in the URL.
            self._warned_token = True
            logging.getLogger("abby.storage").warning(
                "these URLs carry the S3 session token (temporary credentials, X-Amz-Security-Token): "
                "share them only as you would share the token")
        with self._errors("sign a URL for", self._check_key(key)):
            return self._ob.sign(self._store, "GET", key, timedelta(seconds=expires))

    def close(self) -> None:
        """Nothing to release: the client's connection pool goes with the object."""
