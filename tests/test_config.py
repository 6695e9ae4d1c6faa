"""Config discovery, precedence, every error case, and the config commands."""

from __future__ import annotations

import json
import os
import stat
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

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
    assert s.storage.root == platform_dir("user_data_dir") / "shared"
    if sys.platform not in ("win32", "darwin"):  # the XDG variables conftest sets are what Linux uses
        assert s.storage.root == isolated_dirs / "data" / "abby" / "shared"
    assert s.storage.root.is_relative_to(isolated_dirs)
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


def platform_dir(kind: str) -> Path:
    """Where platformdirs puts abby's folder of this kind on the OS running the tests."""
    import platformdirs

    return Path(getattr(platformdirs, kind)("abby", appauthor=False))


def test_search_order(tmp_path, isolated_dirs):
    site_path = platform_dir("site_config_dir") / "abby.toml"
    if not site_path.is_relative_to(isolated_dirs):
        pytest.skip(f"the site config dir {site_path.parent} is system-wide here and cannot be redirected")
    if sys.platform not in ("win32", "darwin"):
        assert site_path == isolated_dirs / "site" / "abby" / "abby.toml"
    assert user_config_path() == platform_dir("user_config_dir") / "abby.toml"
    assert user_config_path().is_relative_to(isolated_dirs)
    site = write_config(site_path, "[storage]\ncleanup_days = 1\n")
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
    ("[storage]\nmax_user_storage_mb = 0\n", "must be from 0.001 to 16777216 MiB"),
    ("[storage]\nmax_global_storage_mb = -5\n", "must be from 0.001 to 16777216 MiB"),
    ("[storage]\ncleanup_days = 0\n", "must be from 0.001 to 36500 days"),
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
    assert "sk-file-secret-123" not in result.stdout and "sk-env-secret-456" not in result.stdout
    rows = {r["key"]: r for r in json.loads(result.stdout)["settings"]}
    assert rows["generation.api_key"] == {"key": "generation.api_key", "value": "********", "source": "env"}
    assert rows["storage.cleanup_days"]["source"] == "file" and rows["storage.cleanup_days"]["value"] == 2
    assert rows["storage.max_user_daily_gens"]["source"] == "env"
    assert rows["storage.max_global_storage_mb"]["source"] == "default"
    root_flag = run_abby("--config", str(cfg), "--root", str(tmp_path / "r"), "config", "show", "--json")
    rows = {r["key"]: r for r in json.loads(root_flag.stdout)["settings"]}
    assert rows["storage.root"] == {"key": "storage.root", "value": str(tmp_path / "r"), "source": "flag"}
    plain = run_abby("--config", str(cfg), "config", "show")
    assert "sk-file-secret-123" not in plain.stdout and "sk-env-secret-456" not in plain.stdout and "********" in plain.stdout


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
        assert bad.returncode == 2 and "must be from 0.001 to 16777216 MiB (16 TiB), got " in bad.stderr
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


# --- bounds: every numeric value that passes is one abby can compute with ---------------------

@pytest.mark.parametrize("text, expected", [
    # 1e-9 MiB is 0 bytes: quota divided by it
    ("[storage]\nmax_user_storage_mb = 1e-9\n", "storage.max_user_storage_mb: must be from 0.001 to 16777216 MiB"),
    ("[storage]\nmax_global_storage_mb = 1e12\n", "must be from 0.001 to 16777216 MiB (16 TiB), got 1000000000000.0"),
    ("[storage]\nimage_generation_size_mb = 0.0000001\n", "storage.image_generation_size_mb: must be from 0.001"),
    # 1e300 days overflowed every cleanup's date arithmetic
    ("[storage]\ncleanup_days = 1e300\n", "storage.cleanup_days: must be from 0.001 to 36500 days (100 years)"),
    ("[storage]\nmax_user_daily_gens = 10000000000\n", "must be a whole number from 1 to 1000000"),
    ("[generation]\nupscale_timeout = 7200\n", "generation.upscale_timeout: must be from 1 to 1800 seconds"),
    ("[generation]\nmax_megapixels = 1000\n", "generation.max_megapixels: must be from 0.01 to 89 megapixels"),
    ("[generation]\nmax_megapixels = 0.0001\n", "must be from 0.01 to 89 megapixels"),
    # no generation could ever fit in the per-user cap
    ("[storage]\nmax_user_storage_mb = 1\nimage_generation_size_mb = 1.5\n",
     "storage.image_generation_size_mb (1.5) is above storage.max_user_storage_mb (1)"),
])
def test_values_out_of_bounds_are_refused_at_load(tmp_path, text, expected):
    cfg = write_config(tmp_path / "abby.toml", text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(cfg) in str(err.value) and expected in str(err.value)


def test_bounds_are_inclusive_and_edge_values_load(tmp_path):
    cfg = write_config(tmp_path / "abby.toml", "[storage]\nmax_global_storage_mb = 16777216\nmax_user_storage_mb = 0.001\n"
                                               "image_generation_size_mb = 0.001\ncleanup_days = 36500\n"
                                               "max_user_daily_gens = 1000000\n[generation]\nupscale_timeout = 1800\n"
                                               "max_megapixels = 89\n")
    s = load_settings(cfg, env={})
    assert s.storage.cleanup_days == 36500 and s.generation.upscale_timeout == 1800


def test_out_of_bounds_env_values_name_the_variable():
    with pytest.raises(ConfigError, match=r"environment variable STORAGE_CLEANUP_DAYS \(storage.cleanup_days\): "
                                          r"must be from 0.001 to 36500 days"):
        load_settings(env={"STORAGE_CLEANUP_DAYS": "1e300"})
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_settings(env={"STORAGE_CLEANUP_DAYS": "inf"})


def test_a_whole_number_key_says_whole_number_for_a_decimal():
    with pytest.raises(ConfigError) as err:
        load_settings(env={"MAX_USER_DAILY_GENS": "3.0"})
    assert "MAX_USER_DAILY_GENS" in str(err.value) and "must be a whole number, got 3.0" in str(err.value)
    with pytest.raises(ConfigError, match="must be a number, got 'many'"):
        load_settings(env={"MAX_USER_DAILY_GENS": "many"})


def test_size_conflicts_name_the_real_source_of_each_side(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(env={"MAX_USER_STORAGE_MB": "6000"})
    assert str(err.value) == ("storage.max_user_storage_mb (6000, from environment variable MAX_USER_STORAGE_MB) "
                              "is above storage.max_global_storage_mb (5000, from the built-in default)")
    cfg = write_config(tmp_path / "abby.toml", "[storage]\nmax_user_storage_mb = 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={"IMAGE_GEN_SIZE_MB": "2"})
    assert str(err.value) == (f"storage.image_generation_size_mb (2, from environment variable IMAGE_GEN_SIZE_MB) "
                              f"is above storage.max_user_storage_mb (1, from {cfg})")
    assert "default" not in str(err.value)


def test_config_set_refuses_a_generation_size_above_the_user_cap(tmp_path):
    cfg = write_config(tmp_path / "abby.toml", "[storage]\nmax_user_storage_mb = 1\n")
    result = run_abby("--config", str(cfg), "config", "set", "storage.image_generation_size_mb", "1.5")
    assert result.returncode == 2
    assert "storage.image_generation_size_mb (1.5) would be above storage.max_user_storage_mb (1)" in result.stderr
    result = run_abby("--config", str(cfg), "config", "set", "storage.max_user_storage_mb", "1e-9")
    assert result.returncode == 2 and "must be from 0.001 to 16777216 MiB (16 TiB)" in result.stderr
    assert cfg.read_text() == "[storage]\nmax_user_storage_mb = 1\n"


def test_the_template_documents_every_bound():
    text = render_template()
    assert "# Allowed: from 0.001 to 36500 days (100 years).\n# Environment: STORAGE_CLEANUP_DAYS" in text
    assert text.count("# Allowed: from 0.001 to 16777216 MiB (16 TiB).") == 3
    assert "reclaimed as abandoned after an hour" in text and "# Allowed: from 1 to 1800 seconds." in text


# --- a key outside any section ----------------------------------------------------------------

def test_a_top_level_key_is_reported_as_outside_any_section(tmp_path):
    cfg = write_config(tmp_path / "abby.toml", 'root = "/srv/abby"\n[storage]\ncleanup_days = 2\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(err.value) == (f"{cfg}: 'root' is a key outside any section; write it under its section: "
                              "[storage] root = ...")
    cfg = write_config(tmp_path / "other.toml", "colour = 3\n")
    with pytest.raises(ConfigError, match=r"'colour' is a key outside any section; every key belongs under one of "
                                          r"\[storage\], \[generation\], \[cli\]"):
        load_settings(cfg, env={})


# --- API keys: checked where they are loaded, never echoed --------------------------------------

BAD_KEYS = ["sk-abc123\rdef", "sk-abc\t123", "sk-abcé123"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_an_unusable_api_key_from_the_file_is_refused_without_echoing_it(tmp_path, key):
    cfg = write_config(tmp_path / "abby.toml", "[generation]\n" + tomli_w.dumps({"api_key": key}))
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    message = str(err.value)
    assert str(cfg) in message and "generation.api_key" in message and "HTTP header" in message
    assert "sk-abc" not in message and "123" not in message


@pytest.mark.parametrize("key", BAD_KEYS)
def test_an_unusable_api_key_from_the_environment_is_refused_without_echoing_it(key):
    with pytest.raises(ConfigError) as err:
        load_settings(env={"STABILITY_API_KEY": key})
    message = str(err.value)
    assert "environment variable STABILITY_API_KEY" in message and "HTTP header" in message
    assert "sk-abc" not in message and "123" not in message


def test_an_api_key_with_surrounding_whitespace_is_used_stripped(tmp_path):
    assert load_settings(env={"STABILITY_API_KEY": " sk-good-1\r\n"}).generation.api_key == "sk-good-1"
    cfg = write_config(tmp_path / "abby.toml", '[generation]\napi_key = "\\tsk-good-2  "\n')
    assert load_settings(cfg, env={}).generation.api_key == "sk-good-2"


def test_config_set_refuses_an_unusable_key_without_echoing_it(tmp_path):
    cfg = write_config(tmp_path / "abby.toml", "")
    bad = run_abby("--config", str(cfg), "config", "set", "generation.api_key", "sk-secret\té")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "generation.api_key" in bad.stderr and "sk-secret" not in bad.stdout + bad.stderr
    assert cfg.read_text() == ""
    good = run_abby("--config", str(cfg), "config", "set", "generation.api_key", "  sk-secret-ok ")
    assert good.returncode == 0, good.stderr
    assert tomllib.loads(cfg.read_text())["generation"]["api_key"] == "sk-secret-ok"


# --- writing while another program holds the file (Windows: WinError 5) --------------------------

def test_config_set_retries_a_file_held_open_then_succeeds(tmp_path, monkeypatch):
    import abbycli.config as config

    cfg = write_config(tmp_path / "abby.toml", "")
    real_replace, failures = os.replace, []

    def busy_twice(src, dst):
        if len(failures) < 2:
            failures.append(src)
            raise PermissionError(13, "Access is denied")
        real_replace(src, dst)

    monkeypatch.setattr(config, "REPLACE_RETRY_DELAYS", (0, 0, 0, 0))
    monkeypatch.setattr(config.os, "replace", busy_twice)
    config.set_value(cfg, "storage.cleanup_days", "3")
    assert len(failures) == 2
    assert tomllib.loads(cfg.read_text())["storage"]["cleanup_days"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["abby.toml"]


def test_config_set_on_a_file_held_open_for_good_is_one_clear_error(tmp_path, monkeypatch):
    import abbycli.config as config

    cfg = write_config(tmp_path / "abby.toml", "[storage]\ncleanup_days = 2\n")
    calls = []

    def always_busy(src, dst):
        calls.append(src)
        raise PermissionError(13, "Access is denied")

    monkeypatch.setattr(config, "REPLACE_RETRY_DELAYS", (0, 0, 0))
    monkeypatch.setattr(config.os, "replace", always_busy)
    with pytest.raises(ConfigError) as err:
        config.set_value(cfg, "storage.cleanup_days", "3")
    assert len(calls) == 4  # three retries after the first attempt
    assert str(err.value) == (f"cannot write {cfg}: access denied (if another program has it open, "
                              "close it and try again)")
    assert cfg.read_text() == "[storage]\ncleanup_days = 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["abby.toml"]  # the temporary file is gone


def test_config_show_masks_the_ledger_password_and_the_s3_secret(tmp_path):
    cfg = write_config(tmp_path / "abby.toml", '[storage]\nledger_url = "postgresql://abby:pg-pass-77@db:5432/abby"\n'
                                               'blobs_url = "s3://bucket/p"\ns3_secret_access_key = "s3-secret-88"\n')
    result = run_abby("--config", str(cfg), "config", "show", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["key"]: r["value"] for r in json.loads(result.stdout)["settings"]}
    assert rows["storage.ledger_url"] == "postgresql://abby:********@db:5432/abby"
    assert rows["storage.s3_secret_access_key"] == "********"
    assert "pg-pass-77" not in result.stdout and "s3-secret-88" not in result.stdout


@pytest.mark.parametrize("key, value, message", [
    ("ledger_url", "mysql://x@y/z", "must be a postgresql://"),
    ("blobs_url", "/srv/images", "must be an s3://bucket/prefix URL"),
    ("url_lifetime", "999999999", "url_lifetime"),
])
def test_backend_settings_are_checked(tmp_path, key, value, message):
    cfg = write_config(tmp_path / "abby.toml", f'[storage]\n{key} = "{value}"\n' if key != "url_lifetime"
                       else f"[storage]\n{key} = {value}\n")
    result = run_abby("--config", str(cfg), "quota")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_ledger_url_passwords_are_masked_wherever_the_url_is_shown(tmp_path):
    from abbycli.config import masked_url

    assert masked_url("postgresql://abby:pw@db:5432/abby") == "postgresql://abby:********@db:5432/abby"
    assert masked_url("postgresql:///abby?host=db&password=pw&user=abby") == \
        "postgresql:///abby?host=db&password=********&user=abby"
    cfg = write_config(tmp_path / "abby.toml", "")
    done = run_abby("--config", str(cfg), "config", "set", "storage.ledger_url", "postgresql://abby:Tops3cret@db/abby")
    assert done.returncode == 0 and "Tops3cret" not in done.stdout + done.stderr and "********" in done.stdout
    bad = run_abby("--config", str(cfg), "config", "set", "storage.ledger_url", "postgresql://abby:Sup3r@S3cret@db/abby")
    assert bad.returncode == 2 and "as %40" in bad.stderr and "S3cret" not in bad.stderr
