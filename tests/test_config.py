"""Config discovery, precedence, every error case, and the config commands."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest

from abbycli.config import KEYS, load_settings, render_template, user_config_path
from abbycli.errors import ConfigError
from conftest import run_abby, write_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_without_any_file(isolated_dirs):
    s = load_settings(env={})
    assert s.config_path is None
    assert s.storage.max_user_storage_mb == 500 and s.storage.max_global_storage_mb == 5000
    assert s.storage.max_user_daily_gens == 5 and s.storage.cleanup_days == 7
    assert s.storage.image_generation_size_mb == 1.5 and s.storage.daily_reset_timezone == "UTC"
    assert s.storage.root == isolated_dirs / "data" / "abby" / "shared"
    assert set(s.sources.values()) == {"default"}


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    cfg = write_config(tmp_path / "abby.toml", "[storage]\nmax_user_storage_mb = 100\nmax_user_daily_gens = 9\n"
                                               "cleanup_days = 3\n")
    env = {"MAX_USER_STORAGE_MB": "200", "MAX_USER_DAILY_GENS": "8"}
    s = load_settings(cfg, {"storage.max_user_storage_mb": "300"}, env=env)
    assert s.storage.max_user_storage_mb == 300 and s.sources["storage.max_user_storage_mb"] == "flag"
    assert s.storage.max_user_daily_gens == 8 and s.sources["storage.max_user_daily_gens"] == "env"
    assert s.storage.cleanup_days == 3 and s.sources["storage.cleanup_days"] == "file"
    assert s.storage.image_generation_size_mb == 1.5 and s.sources["storage.image_generation_size_mb"] == "default"


def test_search_order(tmp_path, isolated_dirs):
    site = write_config(isolated_dirs / "site" / "abby" / "abby.toml", "[storage]\ncleanup_days = 1\n")
    assert load_settings(env={}).config_path == site
    user = write_config(user_config_path(), "[storage]\ncleanup_days = 2\n")
    assert load_settings(env={}).config_path == user
    envfile = write_config(tmp_path / "env.toml", "[storage]\ncleanup_days = 3\n")
    assert load_settings(env={"ABBY_CONFIG": str(envfile)}).config_path == envfile
    flag = write_config(tmp_path / "flag.toml", "[storage]\ncleanup_days = 4\n")
    s = load_settings(flag, env={"ABBY_CONFIG": str(envfile)})
    assert s.config_path == flag and s.storage.cleanup_days == 4


def test_relative_root_is_relative_to_the_config_file(tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "etc" / "abby.toml", '[storage]\nroot = "data/shared"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings(cfg, env={}).storage.root == tmp_path / "etc" / "data" / "shared"
    # From the environment or a flag, a relative root means the current folder.
    assert load_settings(cfg, env={"STORAGE_ROOT": "here"}).storage.root == tmp_path / "here"
    assert load_settings(cfg, {"storage.root": "there"}, env={}).storage.root == tmp_path / "there"


@pytest.mark.parametrize("text, expected", [
    ("[storage\nroot = 1", "invalid TOML"),
    ('[storage]\nroot = "x"\nmax_user_storage_mb = = 3\n', "line 3, column"),
    ("[storage]\nmax_user_storag_mb = 5\n", "did you mean 'storage.max_user_storage_mb'"),
    ("[storag]\nroot = 'x'\n", "did you mean 'storage'"),
    ('[storage]\nmax_user_storage_mb = "lots"\n', "storage.max_user_storage_mb: must be a number"),
    ("[storage]\nmax_user_daily_gens = 2.5\n", "must be a whole number"),
    ("[storage]\nmax_user_daily_gens = true\n", "must be a whole number"),
    ("[storage]\nmax_user_storage_mb = 0\n", "must be greater than 0"),
    ("[storage]\nmax_global_storage_mb = -5\n", "must be greater than 0"),
    ("[storage]\ncleanup_days = 0\n", "must be greater than 0"),
    ("[storage]\nmax_user_storage_mb = 600\nmax_global_storage_mb = 500\n", "is above storage.max_global_storage_mb"),
    ('[storage]\ndaily_reset_timezone = "Mars/Olympus"\n', "unknown time zone"),
    ('[generation]\napi_host = "ftp://x"\n', "must start with https://"),
    ('[cli]\ndefault_user = "a/b"\n', "path separator"),
    ('storage = 3\n', "must be a table"),
])
def test_config_errors_name_file_key_and_problem(tmp_path, text, expected):
    cfg = write_config(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(cfg) in str(err.value)
    assert expected in str(err.value)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="ABBY_CONFIG"):
        load_settings(env={"ABBY_CONFIG": str(tmp_path / "nope.toml")})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="MAX_USER_DAILY_GENS"):
        load_settings(env={"MAX_USER_DAILY_GENS": "many"})
    with pytest.raises(ConfigError, match="MAX_USER_STORAGE_MB.*above"):
        load_settings(env={"MAX_USER_STORAGE_MB": "6000"})


def test_config_error_from_cli_is_one_line_exit_2(tmp_path):
    cfg = write_config(tmp_path / "bad.toml", "[storage]\nmax_user_storage_mb = -1\n")
    result = run_abby("--config", str(cfg), "quota")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "bad.toml" in result.stderr and "max_user_storage_mb" in result.stderr
    missing = run_abby("--config", str(tmp_path / "missing.toml"), "list")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_example_file_documents_every_key_and_is_what_abby_renders():
    text = (REPO / "abby.toml.example").read_text(encoding="utf-8")
    assert text == render_template({"storage.root": "shared"}), "regenerate abby.toml.example from render_template"
    for name in KEYS:
        assert KEYS[name].short in text
    doc = tomllib.loads(text)
    assert doc == {"storage": {"root": "shared"}, "generation": {}, "cli": {}}


def test_example_root_points_at_the_repo_shared_folder():
    s = load_settings(REPO / "abby.toml.example", env={})
    assert s.storage.root == REPO / "shared"


def test_config_show_masks_the_key_and_reports_sources(tmp_path):
    cfg = write_config(tmp_path / "abby.toml", '[generation]\napi_key = "sk-file-secret-123"\n[storage]\ncleanup_days = 2\n')
    result = run_abby("--config", str(cfg), "config", "show", "--json",
                      env={"STABILITY_API_KEY": "sk-env-secret-456", "MAX_USER_DAILY_GENS": "4"})
    assert result.returncode == 0, result.stderr
    assert "secret" not in result.stdout
    rows = {r["key"]: r for r in json.loads(result.stdout)["settings"]}
    assert rows["generation.api_key"] == {"key": "generation.api_key", "value": "********", "source": "env"}
    assert rows["storage.cleanup_days"]["source"] == "file" and rows["storage.cleanup_days"]["value"] == 2
    assert rows["storage.max_user_daily_gens"]["source"] == "env"
    assert rows["storage.max_global_storage_mb"]["source"] == "default"
    root_flag = run_abby("--config", str(cfg), "--root", str(tmp_path / "r"), "config", "show", "--json")
    rows = {r["key"]: r for r in json.loads(root_flag.stdout)["settings"]}
    assert rows["storage.root"] == {"key": "storage.root", "value": str(tmp_path / "r"), "source": "flag"}
    plain = run_abby("--config", str(cfg), "config", "show")
    assert "secret" not in plain.stdout and "********" in plain.stdout


def test_config_init_never_overwrites_silently(isolated_dirs):
    first = run_abby("config", "init")
    assert first.returncode == 0, first.stderr
    path = user_config_path()
    assert path.is_file()
    load_settings(env={})  # the starter file is valid
    path.write_text(path.read_text() + "\n# mine\n")
    again = run_abby("config", "init")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert "# mine" in path.read_text()
    forced = run_abby("config", "init", "--force")
    assert forced.returncode == 0
    assert "# mine" not in path.read_text()
    assert "# mine" in path.with_name("abby.toml.bak").read_text()


def test_config_set_validates_keeps_values_and_is_private(isolated_dirs):
    assert run_abby("config", "set", "storage.max_user_storage_mb", "100").returncode == 0
    assert run_abby("config", "set", "generation.api_key", "sk-very-secret").returncode == 0
    path = user_config_path()
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = tomllib.loads(path.read_text())
    assert doc["storage"]["max_user_storage_mb"] == 100 and doc["generation"]["api_key"] == "sk-very-secret"
    assert "# Cap on one user's stored images" in path.read_text()  # still documented

    for value in ("0", "-3"):
        bad = run_abby("config", "set", "--", "storage.max_user_storage_mb", value)
        assert bad.returncode == 2 and "greater than 0" in bad.stderr
    over = run_abby("config", "set", "storage.max_user_storage_mb", "9000")
    assert over.returncode == 2 and "above" in over.stderr
    typo = run_abby("config", "set", "storage.cleanup_day", "3")
    assert typo.returncode == 2 and "did you mean 'storage.cleanup_days'" in typo.stderr
    assert tomllib.loads(path.read_text())["storage"]["max_user_storage_mb"] == 100  # refused edits changed nothing

    shown = run_abby("config", "set", "generation.api_key", "sk-another-secret")
    assert "sk-another-secret" not in shown.stdout + shown.stderr


def test_config_path_lists_the_search_order(tmp_path):
    cfg = write_config(tmp_path / "abby.toml", "")
    result = run_abby("config", "path", "--json", env={"ABBY_CONFIG": str(cfg)})
    data = json.loads(result.stdout)
    assert data["in_use"] == str(cfg)
    assert [p["from"] for p in data["search"]] == ["$ABBY_CONFIG", "user config", "site config"]
