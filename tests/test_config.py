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


# --- start-up errors: one clear line naming the setting or file, exit code 2 ---------------------

def one_line_exit_2(result) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


def test_junk_tls_certificate_names_the_setting(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    line = one_line_exit_2(run_main("--env-file", "/dev/null", env={"TLS_CERT_FILE": str(cert),
                                                                     "TLS_KEY_FILE": str(key)}))
    assert line.startswith(f"sambaproxy: invalid TLS_CERT_FILE='{cert}': not a PEM certificate")


def test_junk_tls_key_with_a_good_certificate_names_the_key(tmp_path, certificate):
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    line = one_line_exit_2(run_main("--env-file", "/dev/null", env={"TLS_CERT_FILE": certificate[0],
                                                                     "TLS_KEY_FILE": str(key)}))
    assert line.startswith(f"sambaproxy: invalid TLS_KEY_FILE='{key}': not a PEM private key")


def test_good_tls_files_pass_the_start_up_check(certificate):
    context = Config.from_mapping({"TLS_CERT_FILE": certificate[0], "TLS_KEY_FILE": certificate[1]}).ssl_context()
    assert context is not None


def test_env_file_with_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.env"
    path.write_bytes(b"HOST=127.0.0.1\nDEFAULT_MODEL=caf\xe9\n")
    line = one_line_exit_2(run_main("--env-file", str(path)))
    assert line == f"sambaproxy: cannot read env file '{path}': line 2 is not valid UTF-8\n"


def test_env_file_with_a_bom_reads_its_first_line(tmp_path):
    path = tmp_path / "bom.env"
    path.write_bytes("\ufeffPORT=7000\nHOST=127.0.0.2\n".encode("utf-8"))
    assert read_env_file(str(path)) == {"PORT": "7000", "HOST": "127.0.0.2"}


def test_an_env_file_named_explicitly_must_exist_but_the_default_may_be_absent(tmp_path):
    line = one_line_exit_2(run_main("--env-file", str(tmp_path / "nope" / ".env")))
    assert line == f"sambaproxy: cannot read env file '{tmp_path / 'nope' / '.env'}': no such file\n"
    assert read_env_file(str(tmp_path / "absent.env")) == {}


@pytest.mark.parametrize("line, value", [
    ('SAMBA_PASSWORD="s3cret" # the password', "s3cret"),
    ("SAMBA_PASSWORD='s3 #cret'   #comment", "s3 #cret"),
    ('SAMBA_PASSWORD="s3cret"', "s3cret"),
    ('SAMBA_PASSWORD="s3cret"x', '"s3cret"x'),
    ("SAMBA_PASSWORD=plain # comment", "plain"),
    ('SAMBA_PASSWORD="unclosed # comment', '"unclosed'),
])
def test_quoted_values_lose_their_quotes_and_trailing_comments(tmp_path, line, value):
    assert read_env_file(write(tmp_path, line + "\n"))["SAMBA_PASSWORD"] == value


def test_unknown_names_that_look_like_ours_get_one_warning_each(tmp_path):
    path = write(tmp_path, "SAMBA_EMAL=a@b.c\nTOKEN_CACHE_TIMEOUT=5\nUPSTREAM_ZZZ=1\nOTHER_THING=1\n")
    warnings: list[str] = []
    load_config(["--env-file", path], {}, "t", warnings)
    assert warnings == [f"unknown setting SAMBA_EMAL in {path}: did you mean SAMBA_EMAIL?",
                        f"unknown setting TOKEN_CACHE_TIMEOUT in {path}: did you mean TOKEN_CACHE_TIME?",
                        f"unknown setting UPSTREAM_ZZZ in {path}: it is ignored"]


def test_unknown_name_warning_is_logged_at_start_up(tmp_path):
    path = write(tmp_path, "SAMBA_EMAL=a@b.c\nHOST=127.0.0.1\nPORT=0\nTOKEN_CACHE_FILE=\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "sambaproxy.py", "--env-file", path], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if "listening on" in line:
                break
        assert any("WARNING sambaproxy.config: unknown setting SAMBA_EMAL" in s and "SAMBA_EMAIL?" in s
                   for s in seen), seen
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("args, env, expected", [
    ((), {"PORT": "abc"}, "sambaproxy: invalid PORT='abc': must be a port number from 0 to 65535\n"),
    (("--port", "abc"), {}, "sambaproxy: invalid --port 'abc': must be a port number from 0 to 65535\n"),
    (("--port", "99999"), {}, "sambaproxy: invalid --port '99999': must be a port number from 0 to 65535\n"),
    ((), {"UPSTREAM_READ_TIMEOUT": "soon"},
     "sambaproxy: invalid UPSTREAM_READ_TIMEOUT='soon': must be a positive number of seconds\n"),
    ((), {"MAX_BODY_BYTES": "1e3"}, "sambaproxy: invalid MAX_BODY_BYTES='1e3': must be a whole number of at least 1\n"),
])
def test_malformed_numbers_say_what_is_expected_and_flags_are_named_as_flags(args, env, expected):
    assert one_line_exit_2(run_main("--env-file", "/dev/null", *args, env=env)) == expected


def test_a_port_in_use_names_host_and_port():
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_exit_2(run_main("--env-file", "/dev/null", env={"HOST": "127.0.0.1", "PORT": str(port),
                                                                         "TOKEN_CACHE_FILE": ""}))
    assert line.startswith(f"sambaproxy: cannot listen on HOST=127.0.0.1 PORT={port}: ")
