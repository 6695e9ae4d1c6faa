"""What every HTTP provider shares: retries, Retry-After, transport errors, base64 images.

A provider maps its own HTTP error bodies to the package's exceptions; everything
around that (which failures are retried and for how long, what a dropped
connection becomes, how a retry is logged) is the same for all of them, so it
lives here once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..errors import (ApiRejected, ConfigError, InvalidRequest, MalformedResponse, ModelNotFound, PayloadTooLarge,
                      ProviderError, ProviderUnavailable, RateLimited)
from ..secrets import clean_api_key, redact

if TYPE_CHECKING:
    import httpx

# A callback that shows one line of progress ("creative upscale running, 12 s").
Progress = Callable[[str], None]

# Retries are logged under here ("abby.providers.<name>"); the CLI shows them as notes and
# its log file keeps them; a bot's own handlers on "abby" receive them too.
LOG_PREFIX = "abby.providers"


def logger(provider: str) -> logging.Logger:
    return logging.getLogger(f"{LOG_PREFIX}.{provider}")


def checked_key(title: str, api_key: str | None) -> str | None:
    """The key as it will be sent, or None; ConfigError (never quoting it) if it cannot be sent.
    Bots may pass a key straight from their own settings, so it is checked here too."""
    if api_key is None or api_key == "":
        return None
    try:
        return clean_api_key(api_key)
    except ValueError as exc:
        raise ConfigError(f"{title}: {exc}") from None


class RetryPolicy:
    """stamina's ``on`` hook for one request: retry only what may succeed later (a
    ``ProviderUnavailable``), within ``attempts`` and ``timeout``, after a capped exponential
    backoff with jitter or the server's Retry-After. Because the wait is decided here, the
    logged "retrying in N s" is what really happens."""

    def __init__(self, what: str, log: logging.Logger, attempts: int = 4, timeout: float = 180.0,
                 wait_initial: float = 1.0, wait_max: float = 30.0):
        self.what, self.log, self.attempts, self.timeout = what, log, attempts, timeout
        self.wait_initial, self.wait_max = wait_initial, wait_max
        self.failures = 0
        self.started = time.monotonic()

    def __call__(self, exc: Exception) -> bool | float:
        if not isinstance(exc, ProviderUnavailable):
            return False
        self.failures += 1
        if exc.retry_after is not None and exc.retry_after > self.timeout:
            return False  # the server asks for a longer wait than abby would spend in all: fail now
        if exc.retry_after is not None:
            wait = min(exc.retry_after, 60.0)
        else:
            wait = min(self.wait_max, self.wait_initial * 2 ** (self.failures - 1)
                       + random.uniform(0, self.wait_initial))
        if self.failures >= self.attempts or time.monotonic() - self.started + wait > self.timeout:
            return False
        self.log.warning("%s failed: %s; retrying in %.1f s (attempt %d of %d)", self.what, exc, wait,
                         self.failures + 1, self.attempts)
        return float(wait)


def retrying(what: str, log: logging.Logger, **policy: Any):
    """stamina's retry loop with abby's policy deciding each retry and its wait:
    ``async for attempt in retrying(...): with attempt: ...``."""
    import stamina

    # attempts and timeout are the policy's to enforce: stamina stopping on its own would
    # make a logged "retrying in 4 s" untrue.
    return stamina.retry_context(on=RetryPolicy(what, log, **policy), attempts=None, timeout=None)


def retry_after(response: httpx.Response) -> float | None:
    """The server's wait before a retry, in seconds: ``retry-after-ms`` (OpenAI's, more
    precise) or ``Retry-After`` as seconds or an HTTP date; None when absent or unreadable."""
    ms = response.headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


# The largest answer abby reads from a provider: far above any image an API returns (a few
# MiB, or tens as base64 in JSON), and a bound on what a broken or hostile server can make it hold.
MAX_BODY_BYTES = 256 * 1024 * 1024


async def request(http: httpx.AsyncClient, method: str, url: str, *, host: str, secrets: tuple = (),
                  max_bytes: int | None = None, **kwargs: Any) -> httpx.Response:
    """One HTTP exchange, its body read whole but never beyond ``max_bytes``; network failures
    become ProviderUnavailable (retried by the caller's loop) and requests that cannot even be
    built a plain ProviderError (never retried). Messages are scrubbed of ``secrets``. Status
    codes are the caller's to map."""
    import httpx

    max_bytes = MAX_BODY_BYTES if max_bytes is None else max_bytes
    try:
        async with http.stream(method, url, **kwargs) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise MalformedResponse(f"the API at {host} answered with {int(declared):,} bytes, more than the "
                                        f"{max_bytes:,} abby reads")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise MalformedResponse(f"the API at {host} answered with more than the {max_bytes:,} bytes "
                                            "abby reads")
        return httpx.Response(response.status_code, headers=response.headers, content=bytes(body),
                              request=response.request, extensions=response.extensions)
    except httpx.TimeoutException as exc:
        raise ProviderUnavailable(f"the API at {host} did not answer in time ({type(exc).__name__})") from None
    except (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.InvalidURL, UnicodeEncodeError) as exc:
        # h11's message quotes the offending header, which may be the key: never shown.
        raise ProviderError(f"abby could not send the request to {host} ({type(exc).__name__}: an HTTP "
                            "header or the URL is not valid; check the provider's api_host and key)") from None
    except httpx.TransportError as exc:
        reason = redact(str(exc) or type(exc).__name__, *secrets)
        raise ProviderUnavailable(f"cannot reach the API at {host}: {reason}") from None


def json_body(response: httpx.Response) -> Any:
    """The response's JSON, or MalformedResponse."""
    try:
        return response.json()
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; absurdly deep nesting
        raise MalformedResponse(f"the API answered {response.status_code} with a body that is not JSON "
                                "abby can read") from None


def b64_image(value: Any) -> bytes:
    if not isinstance(value, str):
        raise MalformedResponse("the API's answer has no base64 image")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise MalformedResponse("the API's image is not valid base64") from None


MAX_SEED = 4_294_967_295  # 2**32 - 1: the largest seed any of the providers documents


def seed_or_none(value: Any) -> int | None:
    """A seed a provider reports, or None for anything outside 0 .. 2**32-1 (a seed is only
    informative: a bad one must not fail a paid, stored image)."""
    try:
        seed = int(value) if isinstance(value, int) else int(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        return None
    return seed if 0 <= seed <= MAX_SEED else None


def status_error(response: httpx.Response, suffix: str, what: str, limit: str = "") -> ProviderError:
    """The statuses that mean the same at every HTTP API, once a provider has mapped its own
    (auth, credits, moderation): ``what`` names the model or resource, ``suffix`` is the
    scrubbed detail (": ..."), ``limit`` the documented body limit if any."""
    status = response.status_code
    if status == 404:
        return ModelNotFound(f"the API does not know {what} (404){suffix}", status=status)
    if status == 413:
        size = f", {limit}" if limit else ""
        return PayloadTooLarge(f"the request is larger than the API accepts (413{size}){suffix}", status=status)
    if status in (400, 422):
        return InvalidRequest(f"the API rejected the request ({status}){suffix}", status=status)
    if status == 429:
        return RateLimited(f"the API is rate-limiting requests (429){suffix}", status=status,
                           retry_after=retry_after(response))
    if status >= 500:
        return ProviderUnavailable(f"the API had an internal error ({status}){suffix}", status=status,
                                   retry_after=retry_after(response))
    return ApiRejected(f"the API refused the request ({status}){suffix}", status=status)


def short_text(response: httpx.Response, *secrets: str) -> str:
    """The first line of a non-JSON error body, scrubbed before it is cut (no part of a key
    survives at the cut)."""
    text = response.text.strip()
    return redact(text, *secrets).splitlines()[0][:200] if text else ""


async def gather_all(jobs: list[Callable[[], Awaitable[Any]]],
                     on_done: Callable[[Any], Awaitable[None]] | None = None) -> list[Any]:
    """Run ``jobs`` together; each result is a value or the ProviderError it raised.
    ``on_done`` sees each result as soon as it is ready."""

    async def run(job):
        try:
            result = await job()
        except ProviderError as exc:
            result = exc
        if on_done is not None:
            await on_done(result)
        return result

    return await asyncio.gather(*(run(job) for job in jobs))
