"""`abby generate`, `img2img`, `upscale`, `info` and `balance` end to end: the real
entry point in a subprocess against the strict fake Stability server on loopback."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_abby, write_config
from fake_stability import FakeStability, png

KEY = "sk-test-key-123"


@pytest.fixture
def fake():
    server = FakeStability(api_key=KEY)
    url = server.start()
    server.url = url
    yield server
    server.stop()


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\nmax_user_daily_gens = 3\n'
                                                '[cli]\ndefault_user = "alice"\n')


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png(300, 200))
    return path


def abby(cfg, fake, *args, key=KEY):
    env = {"STABILITY_API_HOST": fake.url}
    if key:
        env["STABILITY_API_KEY"] = key
    result = run_abby("--config", str(cfg), *args, env=env)
    assert KEY not in result.stdout + result.stderr, "the API key leaked into the output"
    return result


def daily_left(cfg, fake, user="alice"):
    return json.loads(abby(cfg, fake, "quota", "--user", user, "--json").stdout)["daily"]["remaining"]


def test_generate_stores_the_image_with_metadata(cfg, fake, tmp_path):
    result = abby(cfg, fake, "generate", "a lighthouse on a cliff", "--seed", "0", "--style", "anime",
                  "--aspect", "16:9", "--negative", "fog", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    [image] = data["images"]
    assert {"path", "seed", "finish_reason", "model", "bytes"} <= set(image)
    path = Path(image["path"])
    assert path.is_file() and path.parent == tmp_path / "store" / "images" / "users" / "alice"
    assert image["finish_reason"] == "SUCCESS" and image["model"] == "core" and image["seed"] > 0
    with Image.open(path) as img:
        assert img.size == (1344 // 8, 768 // 8)  # the fake answers 16:9 at 1/8 scale
    sent = fake.requests[0]
    assert sent["path"] == "/v2beta/stable-image/generate/core" and sent["fields"]["seed"] == "0"
    assert sent["headers"]["stability-client-user-id"] != "alice"
    info = json.loads(abby(cfg, fake, "info", str(image["id"]), "--json").stdout)
    assert info["metadata"]["prompt"] == "a lighthouse on a cliff" and info["metadata"]["seed"] == image["seed"]
    assert info["embedded"] == info["metadata"]
    listed = json.loads(abby(cfg, fake, "list", "--json").stdout)
    assert [i["id"] for i in listed] == [image["id"]]
    assert data["quota"]["daily"]["remaining"] == 2


def test_info_reads_any_file_abby_wrote(cfg, fake, tmp_path):
    out = tmp_path / "copy.png"
    assert abby(cfg, fake, "generate", "a fox", "--out", str(out)).returncode == 0
    plain = abby(cfg, fake, "info", str(out))
    assert plain.returncode == 0 and "a fox" in plain.stdout


def test_at_the_limit_no_request_is_sent(cfg, fake):
    assert abby(cfg, fake, "generate", "x", "--count", "3").returncode == 0
    sent = len(fake.requests)
    refused = abby(cfg, fake, "generate", "x")
    assert refused.returncode == 3 and "daily limit" in refused.stderr and "Traceback" not in refused.stderr
    assert len(fake.requests) == sent


def test_429_then_200_is_retried(cfg, fake):
    fake.script.append((429, {"Retry-After": "0"}, {"id": "1", "name": "rate_limit_exceeded",
                                                     "errors": ["slow down"]}))
    result = abby(cfg, fake, "generate", "x")
    assert result.returncode == 0, result.stderr
    assert len(fake.requests) == 2


def test_401_is_not_retried_and_refunded(cfg, fake):
    result = abby(cfg, fake, "generate", "x", key="sk-wrong-key")
    assert result.returncode == 4 and "401" in result.stderr and "STABILITY_API_KEY" in result.stderr
    assert "sk-wrong-key" not in result.stdout + result.stderr
    assert len(fake.requests) == 1
    assert daily_left(cfg, fake) == 3


def test_filtered_is_refunded_and_exits_5(cfg, fake, tmp_path):
    fake.filtered = True
    result = abby(cfg, fake, "generate", "x")
    assert result.returncode == 5 and "content filter" in result.stderr
    assert daily_left(cfg, fake) == 3
    assert not any((tmp_path / "store" / "images").rglob("*.png"))


def test_count_and_concurrency_reuse_connections(cfg, fake):
    fake.latency = 0.05
    result = abby(cfg, fake, "generate", "x", "--count", "3", "--concurrency", "2", "--json")
    assert result.returncode == 0
    assert len(json.loads(result.stdout)["images"]) == 3
    assert fake.connections <= 2  # one pool; at most one connection per request in flight


def test_v1_engine_and_img2img(cfg, fake, picture):
    v1 = abby(cfg, fake, "generate", "x", "--model", "stable-diffusion-xl-1024-v1-0", "--width", "1152",
              "--height", "896", "--json")
    assert v1.returncode == 0, v1.stderr
    assert fake.requests[-1]["json"]["width"] == 1152
    i2i = abby(cfg, fake, "img2img", str(picture), "make it blue", "--strength", "0.6", "--json")
    assert i2i.returncode == 0, i2i.stderr
    sent = fake.requests[-1]
    assert sent["fields"]["mode"] == "image-to-image" and sent["fields"]["strength"] == "0.6"
    sdxl = abby(cfg, fake, "img2img", str(picture), "make it red", "--model", "stable-diffusion-xl-1024-v1-0")
    assert sdxl.returncode == 0, sdxl.stderr
    assert "resized from 300x200" in sdxl.stderr


def test_creative_upscale_polls_to_an_exact_factor(cfg, fake, picture):
    result = abby(cfg, fake, "upscale", str(picture), "--mode", "creative", "--prompt", "sharp", "--factor", "3",
                  "--json")
    assert result.returncode == 0, result.stderr
    [image] = json.loads(result.stdout)["images"]
    with Image.open(image["path"]) as img:
        assert img.size == (900, 600)
    polls = [r for r in fake.requests if r["path"].startswith("/v2beta/results/")]
    assert len(polls) == fake.polls_before_done + 1


def test_fast_and_esrgan_upscales(cfg, fake, picture):
    fast = abby(cfg, fake, "upscale", str(picture), "--json")  # fast is the default with a key
    assert fast.returncode == 0, fast.stderr
    with Image.open(json.loads(fast.stdout)["images"][0]["path"]) as img:
        assert img.size == (1200, 800)
    esr = abby(cfg, fake, "upscale", str(picture), "--mode", "esrgan", "--width", "500", "--json")
    assert esr.returncode == 0, esr.stderr
    with Image.open(json.loads(esr.stdout)["images"][0]["path"]) as img:
        assert img.size == (500, 333)


def test_local_upscale_runs_with_no_key_and_no_network(cfg, tmp_path, picture):
    with socket.socket() as s:  # a port nothing listens on: any request would fail
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run_abby("--config", str(cfg), "upscale", str(picture), "--width", "2048", "--json",
                      env={"STABILITY_API_HOST": dead})
    assert result.returncode == 0, result.stderr
    [image] = json.loads(result.stdout)["images"]
    with Image.open(image["path"]) as img:
        assert img.size == (2048, 1365)
    assert json.loads(run_abby("--config", str(cfg), "quota", "--user", "alice", "--json").stdout)[
        "daily"]["remaining"] == 3


def test_dry_run_sends_nothing_and_masks_the_key(cfg, fake):
    result = abby(cfg, fake, "generate", "x", "--count", "2", "--dry-run", "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert fake.requests == []
    assert data["requests"][0]["headers"]["Authorization"] == "Bearer ********"
    assert data["quota"]["daily_slots"] == 2 and data["quota"]["would_be_refused_by"] is None
    text = abby(cfg, fake, "generate", "x", "--count", "4", "--dry-run")
    assert "WOULD BE REFUSED by the daily limit" in text.stdout


def test_out_copies_every_image(cfg, fake, tmp_path):
    out = tmp_path / "exports" / "pic.png"
    result = abby(cfg, fake, "generate", "x", "--count", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exports" / "pic-1.png").is_file() and (tmp_path / "exports" / "pic-2.png").is_file()
    folder = abby(cfg, fake, "generate", "a fox", "--out", str(tmp_path / "foxes"), "--json")
    [image] = json.loads(folder.stdout)["images"]
    assert (tmp_path / "foxes" / Path(image["path"]).name).is_file()


def test_balance_and_bad_input(cfg, fake, tmp_path):
    bal = abby(cfg, fake, "balance", "--json")
    assert bal.returncode == 0 and json.loads(bal.stdout) == {"credits": 12.5}
    bad = abby(cfg, fake, "generate", "x", "--style", "watercolour")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and fake.requests[-1]["path"] == "/v1/user/balance"
    notimage = tmp_path / "notes.png"
    notimage.write_text("hello")
    assert abby(cfg, fake, "upscale", str(notimage)).returncode == 2
    nokey = abby(cfg, fake, "generate", "x", key=None)
    assert nokey.returncode == 2 and "STABILITY_API_KEY" in nokey.stderr


def test_the_key_never_appears_even_in_debug_tracebacks(cfg, fake):
    result = run_abby("--config", str(cfg), "generate", "x", env={
        "STABILITY_API_HOST": fake.url, "STABILITY_API_KEY": "sk-wrong-secret", "ABBY_DEBUG": "1"})
    assert "sk-wrong-secret" not in result.stdout + result.stderr
    shown = abby(cfg, fake, "config", "show")
    assert "********" in shown.stdout


def test_cfg_scale_and_steps_reach_the_api_where_accepted(cfg, fake):
    sd3 = abby(cfg, fake, "generate", "x", "--model", "sd3.5-medium", "--cfg-scale", "4.5")
    assert sd3.returncode == 0, sd3.stderr
    assert fake.requests[-1]["fields"]["cfg_scale"] == "4.5"
    v1 = abby(cfg, fake, "generate", "x", "--model", "stable-diffusion-xl-1024-v1-0", "--steps", "20",
              "--cfg-scale", "9")
    assert v1.returncode == 0, v1.stderr
    assert fake.requests[-1]["json"]["steps"] == 20 and fake.requests[-1]["json"]["cfg_scale"] == 9
    sent = len(fake.requests)
    assert abby(cfg, fake, "generate", "x", "--steps", "20").returncode == 2  # core has no steps
    assert abby(cfg, fake, "generate", "x", "--model", "sd3.5-large", "--cfg-scale", "20").returncode == 2
    assert len(fake.requests) == sent
