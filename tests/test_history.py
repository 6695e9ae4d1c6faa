"""History, stats and the log file."""

from __future__ import annotations

import json
import time

import pytest

from abbycli import DailyLimitReached
from abbycli.generation.request import ImageRequest
from abbycli.history import query, stats
from conftest import make_png, run_abby, write_config
from fake_stability import FakeStability
from stability_helpers import Recorder, err, ok_image, run_pipeline, small_store


@pytest.fixture
def sm(root):
    with small_store(root) as store:
        yield store


def test_every_attempt_is_recorded_with_its_outcome(sm):
    run_pipeline(sm, Recorder(lambda: ok_image(seed="42")), ImageRequest("text-to-image", prompt="a fox", count=2))
    run_pipeline(sm, Recorder(lambda: ok_image(finish="CONTENT_FILTERED")), ImageRequest("text-to-image", prompt="b"))
    with pytest.raises(DailyLimitReached):
        run_pipeline(sm, Recorder(ok_image), ImageRequest("text-to-image", prompt="c", count=2))
    run_pipeline(sm, Recorder(err(401, errors=["no"])), ImageRequest("text-to-image", prompt="d"))
    run_pipeline(sm, Recorder(err(503, errors=["down"])), ImageRequest("text-to-image", prompt="e"))
    rows = query(sm)
    assert [r["outcome"] for r in rows] == ["failed", "rejected", "refused-limit", "filtered", "success", "success"]
    fox = rows[-1]
    assert fox["prompt"] == "a fox" and fox["seed"] == 42 and fox["bytes"] > 0 and fox["image_id"] is not None
    assert fox["model"] == "core" and fox["operation"] == "text-to-image" and fox["duration"] >= 0
    assert rows[2]["error_type"] == "DailyLimitReached" and "daily limit" in rows[2]["error"]
    assert [r["outcome"] for r in query(sm, limit=2)] == ["failed", "rejected"]
    assert query(sm, user_id="nobody") == []
    assert query(sm, since=time.time() + 60) == []


def test_stats_per_day_outcomes_top_users_and_limit_hits(sm):
    run_pipeline(sm, Recorder(ok_image), ImageRequest("text-to-image", prompt="a", count=2))
    run_pipeline(sm, Recorder(ok_image), ImageRequest("text-to-image", prompt="b"), user="bob")
    with pytest.raises(DailyLimitReached):
        run_pipeline(sm, Recorder(ok_image), ImageRequest("text-to-image", prompt="c", count=3))
    run_pipeline(sm, Recorder(ok_image), ImageRequest("upscale", image=make_png(1000), mode="local"), user="bob")
    data = stats(sm, days=3)
    assert data["providers"] == [
        {"provider": "stability", "generations": 3, "bytes": data["providers"][0]["bytes"], "attempts": 4},
        {"provider": "local", "generations": 1, "bytes": data["providers"][1]["bytes"], "attempts": 1}]
    data["per_day"][-1]["generations"] -= 1  # the local upscale, so the rest reads as before
    data["per_day"][-1]["attempts"] -= 1
    data["outcomes"]["success"] -= 1
    assert [d["day"] for d in data["per_day"]][-1] == sm.quota.today()
    today = data["per_day"][-1]
    assert today["generations"] == 3 and today["attempts"] == 4 and today["bytes"] > 0
    assert data["outcomes"]["success"] == 3 and data["outcomes"]["refused-limit"] == 1
    assert [u["user_id"] for u in data["top_users"]] == ["alice", "bob"]  # alice 2, bob 1 + 1
    assert data["daily_limit_hits"] == {"total": 1, "users": [{"user_id": "alice", "hits": 1}]}
    old = stats(sm, days=1, now=time.time() + 3 * 86400)
    assert old["outcomes"]["success"] == 0


@pytest.fixture
def fake():
    server = FakeStability(api_key="sk-hist-secret-1")
    server.url = server.start()
    yield server
    server.stop()


def test_history_and_stats_commands_and_the_log(tmp_path, fake):
    cfg = write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\nmax_user_daily_gens = 2\n')
    log = tmp_path / "logs" / "abby.log"
    env = {"STABILITY_API_KEY": "sk-hist-secret-1", "STABILITY_API_HOST": fake.url}

    def abby(*args, **kw):
        return run_abby("--config", str(cfg), "--log-file", str(log), *args, env=env | kw.get("extra", {}))

    assert abby("generate", "a lighthouse", "--user", "ann").returncode == 0
    assert abby("generate", "two more", "--user", "ann", "--count", "2").returncode == 3
    assert abby("generate", "bad key", "--user", "ben", extra={"STABILITY_API_KEY": "sk-wrong-9"}).returncode == 4
    listed = json.loads(abby("history", "--json").stdout)
    assert [(r["user_id"], r["outcome"]) for r in listed] == [("ben", "rejected"), ("ann", "refused-limit"),
                                                              ("ann", "success")]
    assert json.loads(abby("history", "--user", "ann", "--limit", "1", "--json").stdout)[0]["outcome"] == "refused-limit"
    assert json.loads(abby("history", "--since", "2999-01-01", "--json").stdout) == []
    assert abby("history", "--since", "yesterday").returncode == 2
    table = abby("history")
    assert "a lighthouse" in table.stdout and "refused-limit" in table.stdout
    data = json.loads(abby("stats", "--json").stdout)
    assert data["outcomes"]["success"] == 1 and data["daily_limit_hits"]["total"] == 1
    assert "Daily-limit hits: 1" in abby("stats").stdout

    store = tmp_path / "store" / "images" / "users" / "ann"
    (tmp_path / "x.png").write_bytes(make_png(500))
    assert abby("cleanup", "--older-than", "0", "--quiet").returncode == 0
    text = log.read_text()
    assert "abby cleanup: deleted 1 image(s)" in text
    assert "abby generate:" in text and "401" in text
    assert "sk-hist-secret-1" not in text and "sk-wrong-9" not in text
    assert not store.exists()


def test_an_unwritable_log_does_not_stop_the_cleanup(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_abby("--root", str(tmp_path / "store"), "--log-file", str(blocker / "abby.log"), "cleanup")
    assert result.returncode == 0 and "cannot write the log file" in result.stderr
