"""Helpers shared by the generation tests: images, a recording MockTransport
handler, generators and a storage manager wired to it. A plain module (not a
conftest) so that each test module imports exactly what it uses."""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import io

import httpx
from PIL import Image

from abbycli import StorageManager
from abbycli.generation.generator import ImageGenerator
from abbycli.pipeline import generate as pipeline_generate

KEY = "sk-unit-secret-987"


def image_bytes(w=64, h=64, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (9, 99, 199)).save(buf, fmt)
    return buf.getvalue()


def ok_image(w=64, h=64, fmt="png", finish="SUCCESS", seed="77"):
    return httpx.Response(200, content=image_bytes(w, h, fmt.upper()),
                          headers={"content-type": f"image/{fmt}", "finish-reason": finish, "seed": seed})


def err(status, **body):
    return httpx.Response(status, json={"id": "x", "name": body.pop("name", "error"), **body})


def multipart(request: httpx.Request) -> tuple[dict, dict]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + request.read())
    fields, files = {}, {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            files[name] = part.get_payload(decode=True)
        else:
            fields[name] = part.get_payload(decode=True).decode()
    return fields, files


class Recorder:
    """A MockTransport handler that records requests and plays answers in order."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer


def gen(recorder, key=KEY, **kw):
    """An ImageGenerator over ``recorder`` with retries that wait next to nothing."""
    kw.setdefault("wait_initial", 0.001)
    kw.setdefault("wait_max", 0.002)
    return ImageGenerator(key, "https://api.test", transport=httpx.MockTransport(recorder), **kw)


def run(coro):
    return asyncio.run(coro)


async def generate(g, req, **kw):
    async with g:
        return await g.generate(req, **kw)


@contextlib.contextmanager
def small_store(root):
    """A store with room for a few images and a daily limit of 3."""
    s = StorageManager(root, max_global_storage_mb=20, max_user_storage_mb=5, max_user_daily_gens=3,
                       image_generation_size_mb=0.5)
    try:
        yield s
    finally:
        s.close()


def run_pipeline(sm, recorder, req, user="alice", key=KEY, gen_options=None, **kw):
    async def go():
        async with gen(recorder, key, **(gen_options or {})) as g:
            return await pipeline_generate(sm, g, req, user, **kw)
    return asyncio.run(go())
