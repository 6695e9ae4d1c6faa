"""S3BlobStore against a real S3-compatible server (SeaweedFS on loopback, from .ci/servers),
plus its configuration, which needs no server."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from abbycli.errors import ConfigError, InvalidInput, NotFound, StorageError
from abbycli.storage.s3 import (
    BlobExists, S3BlobStore, S3Options, parse_blobs_url, resolve_s3_options,
)
from abbycli.storage.safefs import DELETED, UNSAFE
from conftest import make_png

SECRET = "not-the-real-secret-0123456789"
TOKEN = "session-token-abcdefghijklmnop"


def store_from(env: dict[str, str], **changes: str) -> S3BlobStore:
    env = {**env, **changes}
    return S3BlobStore.from_url(env["ABBY_BLOBS_URL"], resolve_s3_options({}, env))


@pytest.fixture
def store(s3_store_env):
    s = store_from(s3_store_env)
    yield s
    s.delete([info.key for info in s.list()])  # the bucket is shared by the whole session
    s.close()


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- against the server


def test_commit_is_create_only(store):
    first, second = make_png(500), make_png(600, color=(0, 0, 255))
    store.commit(store.stage(first), "users/alice/1.png")
    staged = store.stage(second)
    with pytest.raises(BlobExists, match=r"users/alice/1\.png already exists") as caught:
        store.commit(staged, "users/alice/1.png")
    assert caught.value.exit_code == 1 and "\n" not in str(caught.value)
    assert store.read("users/alice/1.png") == first
    assert store.stat("users/alice/1.png").size == 500


def test_stage_sends_nothing_and_discard_is_idempotent(store):
    staged = store.stage(make_png(300))
    assert list(store.list()) == []
    store.discard(staged)
    store.discard(staged)
    with pytest.raises(StorageError, match="already discarded"):
        store.commit(staged, "users/bob/2.png")
    assert store.stat("users/bob/2.png") is None


def test_read_open_and_stat(store):
    data = make_png(1234)
    store.commit(store.stage(data), "users/carol/3.png")
    with store.open("users/carol/3.png") as f:
        assert f.read(8) == data[:8]
        f.seek(0)
        assert f.read() == data
    info = store.stat("users/carol/3.png")
    assert (info.key, info.size) == ("users/carol/3.png", 1234) and abs(info.modified - time.time()) < 300
    assert store.local_path("users/carol/3.png") is None
    assert store.stat("users/carol/none.png") is None
    with pytest.raises(NotFound, match=r"no object users/carol/none\.png$"):
        store.read("users/carol/none.png")
    with pytest.raises(NotFound):
        store.open("users/carol/none.png")
    with pytest.raises(StorageError, match="unsafe key"):
        store.read("../outside.png")


def test_list_by_prefix_takes_whole_names(store):
    for key in ("users/al/1.png", "users/al/2.png", "users/alice/1.png"):
        store.commit(store.stage(make_png(200)), key)
    assert sorted(i.key for i in store.list("users/al")) == ["users/al/1.png", "users/al/2.png"]
    assert sorted(i.key for i in store.list("users/al/")) == ["users/al/1.png", "users/al/2.png"]
    assert len(list(store.list())) == 3


class Proxy(ThreadingHTTPServer):
    """Forwards requests to the S3 server as they are (the Host header, which the signature
    covers, included) and records each one, to see what the client really sends."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), Forward)
        self.upstream, self.seen, self.client = upstream, [], httpx.Client(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path))
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in ("content-length", "connection")]
        answer = self.server.client.request(self.command, self.server.upstream + self.path, headers=headers,
                                            content=body)
        self.send_response(answer.status_code)
        for k, v in answer.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.content)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(s3_store_env):
    server = Proxy(s3_store_env["AWS_ENDPOINT_URL_S3"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    server.client.close()


def test_listing_streams_page_by_page_and_deletes_go_in_batches(store, s3_store_env, proxy):
    keys = [f"users/u{i % 7}/{i}.png" for i in range(1100)]
    data = make_png(100)
    for key in keys:
        store.commit(store.stage(data), key)
    watched = store_from(s3_store_env, AWS_ENDPOINT_URL_S3=proxy.url)

    listing = watched.list()
    first = next(listing)
    assert first.size == 100
    pages = [path for method, path in proxy.seen if method == "GET" and "list-type=2" in path]
    assert len(pages) == 1, "the whole listing was fetched before its first object was handed over"
    assert sorted([first.key] + [i.key for i in listing]) == sorted(keys)
    pages = [path for method, path in proxy.seen if method == "GET" and "list-type=2" in path]
    assert len(pages) == 2 and "continuation-token=" in pages[1]  # S3 pages hold at most 1000

    gone = [f"users/gone/{i}.png" for i in range(5)]  # never written: gone already counts as deleted
    outcome = watched.delete(keys + gone + ["../etc/passwd", "/abs.png"])
    assert outcome == {**dict.fromkeys(keys + gone, DELETED), "../etc/passwd": UNSAFE, "/abs.png": UNSAFE}
    batches = [path for method, path in proxy.seen if method == "POST" and path.endswith("?delete")]
    assert len(batches) == 2  # 1105 keys: one request of 1000 and one of 105, none per key
    assert list(store.list()) == []


def test_presigned_url_serves_the_image_then_expires(store):
    data = make_png(700)
    store.commit(store.stage(data), "users/dan/5.png")
    url = store.url("users/dan/5.png", 2)
    assert url.startswith(store.endpoint + "/") and "X-Amz-Signature=" in url
    assert store.options.secret_access_key not in url
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.content == data
    assert answer.headers["content-type"] == "image/png"  # set from the bytes at commit
    time.sleep(3.2)
    assert httpx.get(url).status_code == 403
    for bad in (0, -1, 8 * 24 * 3600):
        with pytest.raises(InvalidInput, match="presigned URL"):
            store.url("users/dan/5.png", bad)


def test_wrong_secret_is_one_line_without_the_secret(s3_store_env):
    bad = store_from(s3_store_env, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN)
    for call in (lambda: bad.commit(bad.stage(make_png(200)), "users/eve/1.png"),
                 lambda: bad.read("users/eve/1.png"), lambda: list(bad.list()), lambda: bad.stat("users/eve/1.png")):
        with pytest.raises(StorageError) as caught:
            call()
        message = str(caught.value)
        assert type(caught.value) is StorageError and "access denied" in message
        assert message.startswith(bad.describe() + ": ") and "\n" not in message
        assert SECRET not in message and TOKEN not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert bad.delete(["users/eve/1.png"]) == {"users/eve/1.png": "failed"}


def test_store_down_names_the_endpoint(s3_store_env, caplog):
    endpoint = f"http://127.0.0.1:{free_port()}"
    down = store_from(s3_store_env, AWS_ENDPOINT_URL_S3=endpoint)
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        down.commit(down.stage(make_png(200)), "users/fay/1.png")
    assert time.monotonic() - started < 30  # a few quick retries, not obstore's default 3 minutes
    assert str(caught.value) == (f"{down.describe()}: cannot write users/fay/1.png: "
                                 f"cannot reach the S3 endpoint {endpoint}")
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}$"):
        list(down.list())
    assert down.delete(["a.png", "b.png"]) == {"a.png": "failed", "b.png": "failed"}
    assert endpoint in caplog.text and s3_store_env["AWS_SECRET_ACCESS_KEY"] not in caplog.text


# --- configuration: no server needed


def settings(**values):
    return {f"storage.s3_{k}": v for k, v in values.items()}


def test_options_from_the_environment_beat_the_settings():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001/",
           "AWS_DEFAULT_REGION": "eu-west-3", "AWS_ACCESS_KEY_ID": "id-from-env", "AWS_SECRET_ACCESS_KEY": SECRET}
    chosen = resolve_s3_options(settings(endpoint="https://file.example", region="x", access_key_id="id"), env)
    assert chosen == S3Options(endpoint="http://127.0.0.1:9001", region="eu-west-3", access_key_id="id-from-env",
                               secret_access_key=SECRET)
    del env["AWS_ENDPOINT_URL_S3"]
    assert resolve_s3_options({}, env).endpoint == "http://127.0.0.1:9000"
    from_file = resolve_s3_options(settings(endpoint="https://s3.example.com", access_key_id="id",
                                            secret_access_key=SECRET, session_token=TOKEN), {})
    assert (from_file.endpoint, from_file.region, from_file.session_token) == ("https://s3.example.com",
                                                                               "us-east-1", TOKEN)
    assert SECRET not in repr(from_file) and TOKEN not in repr(from_file)


KEYS = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": SECRET}


@pytest.mark.parametrize("env, message", [
    ({"AWS_SECRET_ACCESS_KEY": SECRET}, "needs credentials: set AWS_ACCESS_KEY_ID"),
    ({"AWS_ACCESS_KEY_ID": "id"}, "needs credentials: set AWS_SECRET_ACCESS_KEY"),
    ({**KEYS, "AWS_ENDPOINT_URL_S3": "s3.example.com"}, "AWS_ENDPOINT_URL_S3: the S3 endpoint must be an http"),
    ({**KEYS, "AWS_ENDPOINT_URL": f"http://id:{SECRET}@127.0.0.1:9000"},
     "AWS_ENDPOINT_URL: the S3 endpoint must not carry"),
])
def test_bad_options_are_one_line_config_errors(env, message):
    with pytest.raises(ConfigError, match=message) as caught:
        resolve_s3_options({}, env)
    assert SECRET not in str(caught.value) and caught.value.exit_code == 2


@pytest.mark.parametrize("url", ["file:///srv/images", "s3://", "s3://Bad_Bucket!/x", "s3://ok-bucket/a/../b",
                                 "s3://ok-bucket/a?versionId=1", "s3://ok-bucket/a\\b"])
def test_bad_blobs_urls(url):
    with pytest.raises(ConfigError, match="storage.blobs_url"):
        parse_blobs_url(url)


def test_blobs_url_and_description():
    pytest.importorskip("obstore", reason="the S3 image store needs obstore: pip install '.[test]'")
    assert parse_blobs_url("s3://abby-images/bot/prod/") == ("abby-images", "bot/prod")
    options = S3Options(endpoint="http://127.0.0.1:1", access_key_id="id", secret_access_key=SECRET,
                        session_token=TOKEN)
    store = S3BlobStore.from_url("s3://abby-images/bot/prod/", options)  # builds a client, sends nothing
    assert store.describe() == "s3://abby-images/bot/prod" and store.name == "s3"
    assert S3BlobStore.from_url("s3://abby-images", options).describe() == "s3://abby-images"
    for text in (repr(store), str(store), repr(store.options), store.describe()):
        assert SECRET not in text and TOKEN not in text


def test_import_abbycli_never_imports_obstore():
    code = ("import sys, abbycli, abbycli.storage.s3; "
            "from abbycli.storage.s3 import resolve_s3_options; "
            "assert 'obstore' not in sys.modules, 'obstore imported'; "
            "from abbycli.storage.s3 import S3BlobStore, S3Options; "
            "S3BlobStore.from_url('s3://b-1/p', S3Options(endpoint='http://127.0.0.1:1', access_key_id='i', "
            "secret_access_key='s')); "
            "assert 'obstore' in sys.modules; print('ok')")
    pytest.importorskip("obstore", reason="the S3 image store needs obstore: pip install '.[test]'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_without_obstore_a_config_error_says_what_to_install():
    code = ("import sys; sys.modules['obstore'] = None\n"
            "from abbycli.errors import ConfigError\n"
            "from abbycli.storage.s3 import S3BlobStore, S3Options\n"
            "try:\n"
            "    S3BlobStore.from_url('s3://b-1/p', S3Options(access_key_id='i', secret_access_key='s'))\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "the S3 image store needs the obstore package: pip install 'abbycli[s3]'"


def test_a_session_token_is_used():
    """Temporary credentials sign with their token (a presigned URL must carry it: AWS checks it)."""
    pytest.importorskip("obstore", reason="the S3 image store needs obstore: pip install '.[test]'")
    options = S3Options(endpoint="http://127.0.0.1:1", access_key_id="id", secret_access_key=SECRET)
    plain = S3BlobStore.from_url("s3://abby-images", options).url("users/a/1.png", 60)
    temporary = S3BlobStore.from_url("s3://abby-images", S3Options(**{**vars(options), "session_token": TOKEN}))
    assert "X-Amz-Security-Token" not in plain
    assert f"X-Amz-Security-Token={TOKEN}" in temporary.url("users/a/1.png", 60)
