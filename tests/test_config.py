"""Settings: environment, .env and flags, validation with one clear line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from config import SETTINGS, Config, ConfigError, load_config, read_env_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "settings.env"
    path.write_text(text)
    return str(path)


def test_defaults_match_the_spec():
    config = Config.from_mapping({})
    assert (config.host, config.port, config.token_cache_time) == ("0.0.0.0", 8666, 604800.0)
    assert config.default_model == "DeepSeek-R1" and config.max_body_bytes == 33554432
    assert config.sse_keepalive == 15.0 and config.debug_endpoints is True
    assert config.token_cache_file.endswith(os.path.join(".cache", "sambaproxy", "token.json"))


def test_env_file_syntax(tmp_path):
    path = write(tmp_path, "\n".join([
        "# a comment", "", "export PORT=7000", "HOST='127.0.0.2'", 'DEFAULT_MODEL="Model X"',
        "LOG_LEVEL=debug # trailing comment", "SAMBA_PASSWORD='p#ss word'",
    ]))
    assert read_env_file(path) == {"PORT": "7000", "HOST": "127.0.0.2", "DEFAULT_MODEL": "Model X",
                                   "LOG_LEVEL": "debug", "SAMBA_PASSWORD": "p#ss word"}


def test_environment_wins_over_env_file_and_flags_win_over_both(tmp_path):
    path = write(tmp_path, "PORT=7000\nHOST=10.0.0.1\nDEFAULT_MODEL=from-file\n")
    config = load_config(["--env-file", path, "--port", "7002"],
                         {"PORT": "7001", "HOST": "127.0.0.1"}, "test")
    assert (config.port, config.host, config.default_model) == (7002, "127.0.0.1", "from-file")


def test_local_api_key_list_ignores_spaces_and_empties():
    assert Config.from_mapping({"LOCAL_API_KEY": " a , b,,c "}).local_api_key == ("a", "b", "c")
    assert Config.from_mapping({"LOCAL_API_KEY": ""}).local_api_key == ()


@pytest.mark.parametrize("name, value", [
    ("PORT", "abc"), ("PORT", "70000"), ("TOKEN_CACHE_TIME", "-1"), ("TOKEN_CACHE_TIME", "nan"),
    ("SSE_KEEPALIVE", "-3"), ("UPSTREAM_MAX_CONNECTIONS", "0"), ("MAX_BODY_BYTES", "1e3"),
    ("LOG_LEVEL", "loud"), ("DEBUG_ENDPOINTS", "maybe"), ("SAMBA_COMPLETION_URL", "ftp://x"),
])
def test_malformed_value_names_the_setting(name, value):
    with pytest.raises(ConfigError, match=f"^invalid {name}="):
        Config.from_mapping({name: value})


def test_secret_values_never_appear_in_errors_or_repr():
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"SAMBA_EMAIL": "a@b.c"})
    assert "SAMBA_PASSWORD" in str(info.value)
    config = Config.from_mapping({"SAMBA_EMAIL": "a@b.c", "SAMBA_PASSWORD": "pw-x81",
                                  "LOCAL_API_KEY": "key-x82", "SAMBA_ACCESS_TOKEN": "tok-x83",
                                  "SAMBANOVA_API_KEY": "api-x84"})
    assert not any(s in repr(config) for s in ("pw-x81", "key-x82", "tok-x83", "api-x84"))


def test_tls_needs_both_files(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="TLS_CERT_FILE"):
        Config.from_mapping({"TLS_CERT_FILE": str(cert)})


def run_main(*args, env=None, timeout=20):
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([sys.executable, "sambaproxy.py", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_setting_with_its_default_and_version_prints():
    help_text = run_main("--help").stdout
    for setting in SETTINGS:
        assert setting.name in help_text
    assert "604800" in help_text and "--env-file" in help_text
    assert run_main("--version").stdout.startswith("sambaproxy ")


@pytest.mark.parametrize("env, name", [({"PORT": "abc"}, "PORT"), ({"TOKEN_CACHE_TIME": "-1"}, "TOKEN_CACHE_TIME")])
def test_malformed_setting_stops_start_up_with_one_line(env, name):
    result = run_main("--env-file", "/dev/null", env=env)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and name in result.stderr
    assert "Traceback" not in result.stderr


def test_starts_without_credentials_and_stops_cleanly_on_sigterm(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": "0",
           "TOKEN_CACHE_FILE": "", "HOME": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "sambaproxy.py", "--env-file", "/dev/null"],
                               cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in process.stderr:
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert port, "no listening line"
        import httpx
        assert httpx.get(f"http://127.0.0.1:{port}/info", timeout=5).json()["token_status"] == "not_available"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
