"""The provider seam: discovery through entry points, [providers.<name>] settings,
--provider and --option, and a third-party plugin running through the real pipeline."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import run_abby, write_config

PLUGIN = Path(__file__).parent / "plugin" / "abby_provider_echo.py"


@pytest.fixture
def plugin_path(tmp_path):
    """Install the echo plugin the way pip would lay it out: the module and a dist-info
    folder whose entry_points.txt registers it. Nothing in abby names it."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(PLUGIN, site / PLUGIN.name)
    info = site / "abby_provider_echo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: abby-provider-echo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[abbycli.providers]\necho = abby_provider_echo:EchoProvider\n")
    return site


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\nmax_user_daily_gens = 3\n'
                                                '[cli]\ndefault_user = "alice"\n[providers.echo]\ncolor = "blue"\n')


def abby(cfg, plugin_path, *args, env=None):
    import os

    path = os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")])
    return run_abby("--config", str(cfg), *args, env={"PYTHONPATH": path, **(env or {})})


def daily_left(cfg, plugin_path):
    return json.loads(abby(cfg, plugin_path, "quota", "--user", "alice", "--json").stdout)["daily"]["remaining"]


def test_a_plugin_is_discovered_and_runs_through_the_real_pipeline(cfg, plugin_path):
    listed = abby(cfg, plugin_path, "providers", "--json")
    assert listed.returncode == 0, listed.stderr
    echo = next(p for p in json.loads(listed.stdout)["providers"] if p["name"] == "echo")
    assert echo["operations"] == ["text-to-image"] and echo["configured"] is True

    made = abby(cfg, plugin_path, "generate", "a red door", "--provider", "echo", "-n", "2", "--option",
                "shade=7", "--json")
    assert made.returncode == 0, made.stderr
    images = json.loads(made.stdout)["images"]
    assert [i["model"] for i in images] == ["echo-1", "echo-1"] and all(i["id"] for i in images)
    info = json.loads(abby(cfg, plugin_path, "info", str(images[0]["id"]), "--json").stdout)
    meta = info["metadata"]
    assert (meta["provider"], meta["echo"], meta["options"]) == ("echo", "blue/7", {"shade": "7"})
    rows = json.loads(abby(cfg, plugin_path, "history", "--json").stdout)
    assert {r["provider"] for r in rows} == {"echo"} and len(rows) == 2
    assert daily_left(cfg, plugin_path) == 1  # a plugin's images take daily slots like any other


def test_a_failing_plugin_refunds_its_slots(cfg, plugin_path):
    failed = abby(cfg, plugin_path, "generate", "fail", "--provider", "echo", "-n", "2")
    assert failed.returncode == 1 and "the echo backend is down" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert daily_left(cfg, plugin_path) == 3


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--provider", "echo", "--option", "shad=3"], "did you mean 'shade'"),
    (["generate", "x", "--provider", "echo", "--option", "shade=300"], "--option shade: must be between 0 and 255"),
    (["generate", "x", "--provider", "echo", "--option", "shade"], "write it as KEY=VALUE"),
    (["generate", "x", "--provider", "ecko"], "did you mean 'echo'"),
    (["generate", "x", "--provider", "local"], "provider local cannot do text-to-image"),
])
def test_bad_provider_choices_are_one_line_exit_2_and_cost_nothing(cfg, plugin_path, args, message):
    result = abby(cfg, plugin_path, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert daily_left(cfg, plugin_path) == 3


def test_an_upscale_with_a_provider_that_cannot_names_those_that_can(cfg, plugin_path, tmp_path):
    from conftest import make_image

    picture = tmp_path / "p.png"
    picture.write_bytes(make_image("PNG"))
    result = abby(cfg, plugin_path, "upscale", str(picture), "--provider", "echo")
    assert result.returncode == 2
    assert "provider echo cannot do upscale; providers that can:" in result.stderr
    assert "local" in result.stderr and "stability" in result.stderr


def test_a_provider_table_is_checked_by_the_provider(tmp_path, plugin_path):
    bad = write_config(tmp_path / "bad.toml", '[providers.echo]\ncolour = "red"\n')
    result = abby(bad, plugin_path, "providers")
    assert result.returncode == 2 and "unknown key 'providers.echo.colour' (did you mean 'providers.echo.color'?)" \
        in result.stderr
    unknown = write_config(tmp_path / "unknown.toml", '[providers.nope]\nx = 1\n')
    result = abby(unknown, plugin_path, "providers")
    assert result.returncode == 2 and "unknown provider 'nope'" in result.stderr


def test_provider_settings_come_from_env_then_table_then_legacy_then_default(tmp_path, plugin_path):
    from abbycli.config import load_settings

    sys.path.insert(0, str(plugin_path))
    try:
        import importlib.metadata as md

        from abbycli.generation import provider as registry

        registry._found = None  # read the entry points again, now with the plugin on the path
        md_dist = md.distributions(path=[str(plugin_path)])
        assert any(d.metadata["Name"] == "abby-provider-echo" for d in md_dist)
        cfg = write_config(tmp_path / "a.toml", '[providers.echo]\ncolor = "green"\n'
                                                '[generation]\nmodel = "ultra"\n')
        settings = load_settings(cfg, env={})
        assert settings.provider_config("echo") == {"color": "green"}
        assert load_settings(cfg, env={"ECHO_COLOR": "white"}).provider_config("echo") == {"color": "white"}
        # Stability's settings from before providers still apply, under its own table's
        stability = settings.provider_config("stability")
        assert stability["model"] == "ultra" and stability["api_host"] == "https://api.stability.ai"
        both = write_config(tmp_path / "b.toml", '[generation]\nmodel = "ultra"\n[providers.stability]\nmodel = "core"\n')
        assert load_settings(both, env={}).provider_config("stability")["model"] == "core"
    finally:
        sys.path.remove(str(plugin_path))
        registry._found = None


def test_a_legacy_stability_model_is_still_checked(tmp_path):
    from abbycli.config import load_settings
    from abbycli.errors import ConfigError

    cfg = write_config(tmp_path / "a.toml", '[generation]\nmodel = "dall-e-3"\n')
    with pytest.raises(ConfigError, match=r"a\.toml \(generation\.model\): unknown model 'dall-e-3'"):
        load_settings(cfg, env={}).provider_config("stability")


def test_a_workflow_path_in_the_file_is_relative_to_the_file(tmp_path, monkeypatch):
    from abbycli.config import load_settings

    cfg = write_config(tmp_path / "conf" / "abby.toml", '[providers.comfyui]\nupscale_workflow = "flows/up.json"\n')
    monkeypatch.chdir(tmp_path)
    config = load_settings(cfg, env={}).provider_config("comfyui")
    assert Path(config["upscale_workflow"]) == tmp_path / "conf" / "flows" / "up.json"
