"""Settings: environment parsing, CLI overrides, clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mediaserver.__main__ import main
from mediaserver.config import ConfigError, Settings, load_dotenv_file, unknown_settings
from mediaserver.twilio_rest import TwilioCredentials


def test_config_defaults_need_no_keys() -> None:
    s = Settings.from_env({})
    assert (s.provider, s.port, s.host, s.development_mode) == ("echo", 8080, "0.0.0.0", True)
    assert s.openai_realtime_url == "wss://api.openai.com/v1/realtime"


def test_config_reads_environment_and_overrides_win() -> None:
    env = {
        "MEDIASERVER_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-test",
        "MEDIASERVER_PORT": "9000",
        "TWILIO_AUTH_TOKEN": "secret",
        "MEDIASERVER_STREAM_TIMEOUT_S": "2.5",
        "OPENAI_AUDIO_FORMAT": "pcm24k",
    }
    s = Settings.from_env(env, port=9100)
    assert (s.provider, s.openai_api_key, s.port, s.stream_timeout_s) == ("openai", "sk-test", 9100, 2.5)
    assert s.openai_audio == "pcm24k" and not s.development_mode


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEDIASERVER_PROVIDER": "openai"}, "needs OPENAI_API_KEY"),
        ({"MEDIASERVER_PROVIDER": "nope"}, "MEDIASERVER_PROVIDER must be one of"),
        ({"MEDIASERVER_PORT": "eighty"}, "MEDIASERVER_PORT must be a whole number"),
        ({"MEDIASERVER_PORT": "70000"}, "MEDIASERVER_PORT must be 1-65535"),
        ({"MEDIASERVER_IDLE_TIMEOUT_S": "0"}, "MEDIASERVER_IDLE_TIMEOUT_S must be a positive number of seconds"),
        ({"MEDIASERVER_MODEL_PING_S": "-1"}, r"MEDIASERVER_MODEL_PING_S must be 0 \(never\) or at least 1 \(seconds\), not -1.0"),
        ({"MEDIASERVER_MODEL_PING_S": "inf"}, r"MEDIASERVER_MODEL_PING_S must be 0 \(never\) or at least 1 \(seconds\), not inf"),
        ({"MEDIASERVER_MODEL_PING_S": "0.001"}, r"MEDIASERVER_MODEL_PING_S must be 0 \(never\) or at least 1"),
        ({"MEDIASERVER_MAX_CALL_S": "nan"}, r"MEDIASERVER_MAX_CALL_S must be a positive number of seconds, not nan"),
        ({"MEDIASERVER_TOOL_TIMEOUT_S": "inf"}, r"MEDIASERVER_TOOL_TIMEOUT_S must be a positive number of seconds, not inf"),
        ({"MEDIASERVER_CHUNK_MS": "30"}, r"MEDIASERVER_CHUNK_MS must be 20, 40, \.\.\. or 200, not 30"),
        ({"MEDIASERVER_CHUNK_MS": "0"}, r"MEDIASERVER_CHUNK_MS must be 20, 40, \.\.\. or 200, not 0"),
        ({"MEDIASERVER_CHUNK_MS": "220"}, r"MEDIASERVER_CHUNK_MS must be 20, 40, \.\.\. or 200, not 220"),
        ({"MEDIASERVER_MAX_CALLS": "-1"}, r"MEDIASERVER_MAX_CALLS must be 0 \(no limit\) or a number of calls, not -1"),
        ({"MEDIASERVER_MAX_CALLS": "many"}, r"MEDIASERVER_MAX_CALLS"),
        ({"OPENAI_AUDIO_FORMAT": "pcm16"}, "OPENAI_AUDIO_FORMAT must be pcmu or pcm24k"),
        ({"MEDIASERVER_PROVIDER": "elevenlabs", "ELEVENLABS_AGENT_ID": "bad id"},
         r"ELEVENLABS_AGENT_ID must be an agent id \(letters, digits, _ and -\), not 'bad id'"),
        ({"MEDIASERVER_PUBLIC_URL": "example.com"}, "MEDIASERVER_PUBLIC_URL must start with https://"),
        ({"MEDIASERVER_PUBLIC_URL": "https://voice.example.com:443x"}, "MEDIASERVER_PUBLIC_URL is malformed"),
        ({"MEDIASERVER_PUBLIC_URL": "https://voice.example.com/?a=1"}, "MEDIASERVER_PUBLIC_URL must not have a query"),
        ({"MEDIASERVER_INSTANCE_URL": "wss://a.example.com"}, "MEDIASERVER_INSTANCE_URL must be https://host"),
        ({"MEDIASERVER_INSTANCE_URL": "https://a.example.com/?x=1"}, "MEDIASERVER_INSTANCE_URL must not have a query"),
        ({"MEDIASERVER_INSTANCE_URL": "https://a.example.com:port"}, "MEDIASERVER_INSTANCE_URL is malformed"),
        ({"MEDIASERVER_LOG_LEVEL": "verbose"}, "MEDIASERVER_LOG_LEVEL must be one of DEBUG, INFO, WARNING, WARN, ERROR, CRITICAL"),
        ({"MEDIASERVER_LOG_FORMAT": "xml"}, "MEDIASERVER_LOG_FORMAT must be text or json"),
        ({"MEDIASERVER_PORT": "8080.0"}, "MEDIASERVER_PORT must be a whole number, not '8080.0'"),
        # Settings a call or a command would only trip over later: refused at start
        ({"TWILIO_ACCOUNT_SID": "garbage"}, "TWILIO_ACCOUNT_SID must be AC followed by 32 hex digits, not 'garbage'"),
        ({"TWILIO_API_KEY_SID": "AC" + "0" * 32}, "TWILIO_API_KEY_SID must be SK followed by 32 hex digits"),
        ({"TWILIO_FROM_NUMBER": "555-1234"}, r"TWILIO_FROM_NUMBER must be an E\.164 number"),
        ({"TWILIO_API_KEY_SID": "SK" + "0" * 32, "TWILIO_ACCOUNT_SID": "AC" + "0" * 32},
         "TWILIO_API_KEY_SID needs TWILIO_API_KEY_SECRET: set both"),
        ({"TWILIO_API_KEY_SECRET": "s", "TWILIO_ACCOUNT_SID": "AC" + "0" * 32}, "TWILIO_API_KEY_SECRET needs TWILIO_API_KEY_SID"),
        ({"TWILIO_API_KEY_SID": "SK" + "0" * 32, "TWILIO_API_KEY_SECRET": "s"},
         "TWILIO_API_KEY_SID needs TWILIO_ACCOUNT_SID, the account the key belongs to"),
        ({"TWILIO_API_BASE": "garbage"}, "TWILIO_API_BASE must be an http:// or https:// URL"),
        ({"TWILIO_API_BASE": "ftp://api.twilio.com"}, "TWILIO_API_BASE must be an http:// or https:// URL"),
        ({"TWILIO_API_BASE": "https://api.twilio.com:abc"}, "TWILIO_API_BASE must be an http:// or https:// URL"),
        ({"DATABASE_URL": "mysql://user:secret@db/calls"}, "DATABASE_URL must be a postgresql:// URL, not mysql$"),
    ],
)
def test_config_bad_values_raise_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_config_call_urls_are_the_instance_s_when_it_has_one() -> None:
    public = Settings.from_env({"MEDIASERVER_PUBLIC_URL": "https://voice.example.com"})
    assert public.call_url == "https://voice.example.com" and public.signed_url_bases == ("https://voice.example.com",)
    both = public.with_(instance_url="https://a.example.com")
    assert both.call_url == "https://a.example.com"
    assert both.signed_url_bases == ("https://voice.example.com", "https://a.example.com")
    alone = Settings.from_env({"MEDIASERVER_INSTANCE_URL": "https://a.example.com/node"})
    assert alone.call_url == "https://a.example.com/node" and alone.signed_url_bases == (None, "https://a.example.com/node")
    assert Settings.from_env({}).call_url is None


def test_config_cli_reports_a_missing_key_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MEDIASERVER_PROVIDER", "openai")
    assert main(["serve", "--env-file", ""]) == 2
    assert "needs OPENAI_API_KEY" in capsys.readouterr().err


def test_config_cli_instance_url_is_checked_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MEDIASERVER_INSTANCE_URL", raising=False)
    assert main(["serve", "--env-file", "", "--instance-url", "a.example.com"]) == 2
    assert "error: --instance-url (MEDIASERVER_INSTANCE_URL) must be https://host" in capsys.readouterr().err  # (the flag given)


def test_config_settings_command_lists_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    for env, _, _ in Settings.describe():
        assert env in out


def test_config_cli_a_bad_log_level_is_a_configuration_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MEDIASERVER_LOG_LEVEL", raising=False)
    assert main(["serve", "--env-file", "", "--log-level", "verbose"]) == 2
    assert "error: --log-level (MEDIASERVER_LOG_LEVEL) must be one of" in capsys.readouterr().err
    monkeypatch.setenv("MEDIASERVER_LOG_LEVEL", "verbose")  # the variable, no flag: named as before
    assert main(["serve", "--env-file", ""]) == 2
    assert "error: MEDIASERVER_LOG_LEVEL must be one of" in capsys.readouterr().err
    assert Settings.from_env({"MEDIASERVER_LOG_LEVEL": "debug", "MEDIASERVER_LOG_FORMAT": "json"}).log_format == "json"
    for level in ("warn", "CRITICAL", "Error"):
        assert Settings.from_env({"MEDIASERVER_LOG_LEVEL": level, "MEDIASERVER_LOG_FORMAT": "JSON"}).log_level == level


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    missing = [env for env, _default, _doc in Settings.describe() if f"`{env}`" not in readme]
    assert missing == []


def test_serve_freezes_the_start_up_objects_out_of_the_collectors_way() -> None:
    """`mediaserver serve` calls this once it is listening: full collections then skip the modules and app."""
    import gc

    from mediaserver.__main__ import freeze_startup_objects

    garbage: list[object] = []
    garbage.append(garbage)  # a cycle: collected first, not frozen
    del garbage
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 1000
        assert gc.collect() == 0  # nothing collectable was left behind, and the frozen objects are not walked
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_the_start_banner_names_the_instance_url_when_there_is_one(capsys: pytest.CaptureFixture[str]) -> None:
    from mediaserver.__main__ import _print_next_steps

    _print_next_steps(Settings.from_env({"MEDIASERVER_PUBLIC_URL": "https://voice.example.com"}), ["http://0.0.0.0:8080"])
    single = capsys.readouterr().out
    assert "https://voice.example.com/twiml" in single and "MEDIASERVER_INSTANCE_URL" not in single
    settings = Settings.from_env({"MEDIASERVER_PUBLIC_URL": "https://voice.example.com", "MEDIASERVER_INSTANCE_URL": "https://voice.example.com/n1"})
    _print_next_steps(settings, ["http://0.0.0.0:8081"])
    out = capsys.readouterr().out
    assert "https://voice.example.com/twiml" in out  # the console webhook stays the shared URL
    assert "come back to https://voice.example.com/n1 (MEDIASERVER_INSTANCE_URL)" in out
    assert "MEDIASERVER_MAX_CALLS" not in single + out
    _print_next_steps(Settings.from_env({"MEDIASERVER_MAX_CALLS": "300"}), ["http://0.0.0.0:8080"])
    assert "listening on http://0.0.0.0:8080, at most 300 calls at once (MEDIASERVER_MAX_CALLS)\n" in capsys.readouterr().out


def test_the_start_banner_asks_only_for_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    from mediaserver.__main__ import _print_next_steps

    _print_next_steps(Settings.from_env({}), ["http://0.0.0.0:8080"])
    bare = capsys.readouterr().out
    assert "ngrok http 8080) and set MEDIASERVER_PUBLIC_URL" in bare
    assert "set TWILIO_AUTH_TOKEN (in the environment or .env)" in bare
    assert "settings (another port, say: MEDIASERVER_PORT=8081" in bare
    done = Settings.from_env({"MEDIASERVER_PUBLIC_URL": "https://voice.example.com", "TWILIO_AUTH_TOKEN": "t" * 32})
    _print_next_steps(done, ["http://0.0.0.0:8080"])
    out = capsys.readouterr().out
    assert "MEDIASERVER_PUBLIC_URL" not in out and "TWILIO_AUTH_TOKEN" not in out
    assert "https://voice.example.com/twiml" in out


@pytest.mark.parametrize(
    ("host", "base"),
    [("0.0.0.0", "http://127.0.0.1:8081"), ("::", "http://127.0.0.1:8081"), ("::1", "http://[::1]:8081"),
     ("10.0.0.5", "http://10.0.0.5:8081"), ("localhost", "http://localhost:8081")],
)
def test_next_steps_reach_the_server_where_it_listens(host: str, base: str, capsys: pytest.CaptureFixture[str]) -> None:
    from mediaserver.__main__ import _print_next_steps

    _print_next_steps(Settings(host=host, port=8081), [f"http://{host}:8081"])
    out = capsys.readouterr().out
    assert f"curl {base}/healthz" in out and f"dial {base}/twiml" in out


def test_a_public_url_real_calls_would_not_work_with_is_warned_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from mediaserver.__main__ import _warn_unused

    caplog.set_level("WARNING", logger="mediaserver")
    _warn_unused(Settings(public_url="http://voice.example.com/app/"))
    [scheme] = [r.getMessage() for r in caplog.records]
    assert scheme.startswith("MEDIASERVER_PUBLIC_URL is http://: the TwiML then points Twilio at "
                             "ws://voice.example.com/app/media-stream, and Twilio takes only wss:// Media Streams")
    caplog.clear()
    _warn_unused(Settings(public_url="https://voice.example.com/app/twiml"))
    [route] = [r.getMessage() for r in caplog.records]
    assert route == (
        "MEDIASERVER_PUBLIC_URL ends in /twiml: it is this server's base URL, and the routes are added to it "
        "(the voice webhook would be https://voice.example.com/app/twiml/twiml); did you mean https://voice.example.com/app?"
    )
    caplog.clear()
    _warn_unused(Settings(public_url="http://user:hunter2@voice.example.com/twiml"))  # (credentials: not logged)
    assert len(caplog.records) == 2 and not any("hunter2" in r.getMessage() for r in caplog.records)
    assert "did you mean http://voice.example.com?" in caplog.records[1].getMessage()
    caplog.clear()
    for fine in ("https://voice.example.com", "https://voice.example.com/app/", "https://voice.example.com/twimlets"):
        _warn_unused(Settings(public_url=fine))
    assert caplog.records == []


def test_a_failure_message_that_cannot_be_spoken_is_said_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """Without Twilio REST credentials the failure message is not spoken: the start says so, once a model may fail."""
    from mediaserver.__main__ import _warn_unused

    caplog.set_level("INFO", logger="mediaserver")
    model = {"provider": "openai", "openai_api_key": "sk-" + "x" * 40}
    _warn_unused(Settings(**model))
    [said] = [r for r in caplog.records if "FAILURE_MESSAGE" in r.getMessage()]
    assert said.levelname == "INFO" and "hears silence, then the line ends" in said.getMessage()
    caplog.clear()
    rest = {"twilio_account_sid": "AC" + "0" * 32, "twilio_auth_token": "t" * 32}
    for quiet in (Settings(**model, **rest), Settings(**model, failure_message="off"), Settings(provider="echo")):
        _warn_unused(quiet)  # (spoken; not wanted; the echo agent never fails)
        assert not any("FAILURE_MESSAGE" in r.getMessage() for r in caplog.records), quiet


def test_the_routes_a_public_url_must_not_end_in_are_the_apps() -> None:
    """Every POST route of the app and the Media Stream: a route added or renamed there must be added here too."""
    from mediaserver.__main__ import _ROUTES
    from mediaserver.app import MEDIA_STREAM_PATH, create_app
    from mediaserver.bridge.registry import CallManager

    app = create_app(Settings(), CallManager(Settings()))
    posted = {rule.rule for rule in app.url_map.iter_rules() if "POST" in (rule.methods or ())}
    assert set(_ROUTES) == posted | {MEDIA_STREAM_PATH}


def test_flags_without_a_command_are_serves(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`mediaserver --port 8081` is `mediaserver serve --port 8081` (argparse took the value for a command)."""
    from mediaserver.__main__ import main

    monkeypatch.delenv("MEDIASERVER_PORT", raising=False)
    assert main(["--port", "0", "--env-file", ""]) == 2  # as serve's own flag: the port is checked
    assert "mediaserver: configuration error: --port (MEDIASERVER_PORT)" in capsys.readouterr().err
    assert main(["--env-file", "settings", "--port=0"]) == 2  # (a value that is a command's name is a value)
    assert "--env-file" in capsys.readouterr().err
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["--provider", "openai", "--env-file", ""]) == 2  # a setting's value in the message: the flag named too
    assert capsys.readouterr().err == (
        "mediaserver: configuration error: --provider openai (MEDIASERVER_PROVIDER) needs OPENAI_API_KEY\n"
    )
    for version in ("--version", "--vers"):  # (argparse's abbreviation, as before)
        with pytest.raises(SystemExit) as exited:
            main([version])
        assert exited.value.code == 0 and capsys.readouterr().out.startswith("mediaserver ")


def test_serve_on_a_port_in_use_says_so_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import socket

    for name in ("MEDIASERVER_HOST", "MEDIASERVER_PORT", "MEDIASERVER_PROVIDER", "MEDIASERVER_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDIASERVER_DATA_DIR", str(tmp_path / "data"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--env-file", "", "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"mediaserver: cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()  # nothing created (the call records' database) before it stopped


def test_serve_binds_hosts_as_hypercorn_did() -> None:
    """IPv4 unless the host has a ':' (brackets allowed), a name resolves to IPv4, "" is every interface."""
    import socket

    from mediaserver.server import ListenError, listen_socket

    for host, family, address in (("127.0.0.1", socket.AF_INET, "127.0.0.1"), ("localhost", socket.AF_INET, "127.0.0.1"),
                                  ("", socket.AF_INET, "0.0.0.0")):
        with listen_socket(host, 0, 8) as sock:
            assert (sock.family, sock.getsockname()[0]) == (family, address)
            assert not sock.getblocking()
    if socket.has_ipv6:
        try:
            with listen_socket("[::1]", 0, 8) as sock:
                assert (sock.family, sock.getsockname()[0]) == (socket.AF_INET6, "::1")
        except ListenError as exc:  # a machine without IPv6 on loopback
            assert "cannot listen on [::1]:0" in str(exc)
    with pytest.raises(ListenError, match="cannot listen on no-such-host.invalid:0"):
        listen_socket("no-such-host.invalid", 0, 8)


def test_config_env_file_named_on_the_command_line_must_exist(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # (no .env here: the default stays optional)
    assert load_dotenv_file() is False
    assert load_dotenv_file("") is False
    # (a bad log level too: were the file skipped, the command would still stop, for another reason)
    assert main(["serve", "--env-file", "prod.evn", "--log-level", "verbose"]) == 2
    assert "--env-file 'prod.evn': no such file" in capsys.readouterr().err


def test_config_env_file_that_is_not_utf8_is_a_configuration_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = tmp_path / "latin1.env"
    env.write_bytes(b"AGENT_GREETING=caf\xe9\n")
    with pytest.raises(ConfigError, match="must be a UTF-8 text file"):
        load_dotenv_file(env)
    assert main(["serve", "--env-file", str(env), "--log-level", "verbose"]) == 2
    assert "configuration error: cannot read" in capsys.readouterr().err


def test_config_env_file_fills_variables_set_but_empty_and_keeps_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = tmp_path / "x.env"
    env.write_text(
        "export OPENAI_API_KEY='sk-from-file'\nAGENT_VOICE=file\r\nAGENT_GREETING=\"from file\" # comment\n"
        "MS_TEST_HOST=file.example\nMS_TEST_URL=https://${MS_TEST_HOST}/x\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", "")  # as docker-compose passes an unset ${OPENAI_API_KEY}
    monkeypatch.setenv("AGENT_VOICE", "from-environment")
    monkeypatch.setenv("MS_TEST_HOST", "env.example")
    for name in ("AGENT_GREETING", "MS_TEST_URL"):  # (set, so that monkeypatch restores them: unset)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert load_dotenv_file(env) is True
    import os

    assert os.environ["OPENAI_API_KEY"] == "sk-from-file"
    assert os.environ["AGENT_VOICE"] == "from-environment"
    assert os.environ["AGENT_GREETING"] == "from file"
    assert os.environ["MS_TEST_URL"] == "https://env.example/x"  # interpolation, too, prefers the real environment


def test_config_env_file_dev_null_is_an_empty_file() -> None:
    import os

    assert load_dotenv_file(os.devnull) is False  # (exists, not a regular file: the benches pass it for "no settings")


@pytest.mark.parametrize(
    ("text", "line", "shown"),
    [
        ("MEDIASERVER_PORT = 18126\nMEDIASERVER_HOST: 127.0.0.1\n", 2, "'MEDIASERVER_HOST: 127.0.0.1'"),
        ('MEDIASERVER_PORT="18123\n', 1, "'MEDIASERVER_PORT=\"18123'"),  # a quote never closed
        ("# settings\n=foo\nMEDIASERVER_PORT=1\njunk line\n", 2, "'=foo' (and 1 more)"),
    ],
)
def test_config_env_file_line_that_does_not_parse_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, line: int, shown: str
) -> None:
    # python-dotenv would skip the line with a warning naming no file, and the server would start without it
    # (on every interface instead of the loopback the second line asks for).
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(text)
    for name in ("MEDIASERVER_PORT", "MEDIASERVER_HOST"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=f"'.env' line {line}: not KEY=value: {re.escape(shown)}"):
        load_dotenv_file()
    assert "MEDIASERVER_PORT" not in os.environ  # nothing of a refused file is loaded
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert f"configuration error: '.env' line {line}: not KEY=value" in err and "python-dotenv" not in err


def test_config_env_file_that_is_a_directory_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["serve", "--env-file", str(tmp_path), "--log-level", "verbose"]) == 2
    assert f"--env-file {str(tmp_path)!r} is a directory" in capsys.readouterr().err


def test_next_steps_name_the_command_as_it_runs_from_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mediaserver import __main__ as cli

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "mediaserver").write_text("#!/bin/sh\n")
    monkeypatch.setattr(cli.sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)  # make run: the environment is not activated
    assert cli._command() == ".venv/bin/mediaserver"
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/local/bin/mediaserver")  # another install's
    assert cli._command() == ".venv/bin/mediaserver"
    monkeypatch.setattr(cli.shutil, "which", lambda name: str(bin_dir / "mediaserver"))  # activated
    assert cli._command() == "mediaserver"


def test_config_openai_transcription_of_the_caller_is_on_unless_turned_off() -> None:
    from mediaserver.adapters.openai import openai_config

    on = Settings.from_env({"MEDIASERVER_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test"})
    assert openai_config(on).transcription_model == "gpt-live-transcribe"
    for word in ("off", "OFF", "Off"):  # (as the other settings' words: any case)
        assert openai_config(on.with_(openai_transcription_model=word)).transcription_model is None


def test_config_openai_reasoning_effort() -> None:
    from mediaserver.adapters.openai import openai_config

    base = {"MEDIASERVER_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test"}
    assert openai_config(Settings.from_env(base)).reasoning_effort is None  # the model's default: nothing sent
    assert openai_config(Settings.from_env({**base, "OPENAI_REASONING_EFFORT": "low"})).reasoning_effort == "low"
    with pytest.raises(ConfigError, match="OPENAI_REASONING_EFFORT must be minimal, low, medium, high or xhigh, not 'max'"):
        Settings.from_env({**base, "OPENAI_REASONING_EFFORT": "max"})


def test_config_openai_key_goes_as_azure_wants_it_on_azure() -> None:
    from mediaserver.adapters.openai import auth_headers

    assert auth_headers("wss://api.openai.com/v1/realtime", "sk-1") == [("Authorization", "Bearer sk-1")]
    assert auth_headers("wss://proxy.example/v1/realtime?x=1", "k") == [("Authorization", "Bearer k")]
    for url in ("wss://my-res.openai.azure.com/openai/v1/realtime?model=rt",
                "wss://my-res.cognitiveservices.azure.com/openai/realtime?api-version=2025-04-01-preview&deployment=rt"):
        assert auth_headers(url, "az-key") == [("api-key", "az-key")]
    assert auth_headers("wss://notazure.com/v1/realtime", "k") == [("Authorization", "Bearer k")]


def test_config_a_setting_of_only_spaces_counts_as_unset() -> None:
    blank = {name: "  " for name in ("DATABASE_URL", "TWILIO_ACCOUNT_SID", "TWILIO_FROM_NUMBER", "MEDIASERVER_PUBLIC_URL")}
    settings = Settings.from_env(blank)
    assert (settings.database_url, settings.twilio_account_sid, settings.twilio_from_number, settings.public_url) == (
        None, None, None, None,
    )


def test_config_a_misspelled_setting_is_named_with_the_one_meant() -> None:
    environ = {"MEDIASERVER_PROVIDR": "openai", "MEDIASERVER_PORT": "1", "MEDIASERVER_WHATEVER": "x",
               "MEDIASERVER_NATIVE_FLAGS": "-O3", "MEDIASERVER_ONLY": "_g711", "OTHER": "y"}  # setup.py's are known
    assert unknown_settings(environ) == [("MEDIASERVER_PROVIDR", "MEDIASERVER_PROVIDER"), ("MEDIASERVER_WHATEVER", None)]


def test_config_a_bare_key_in_env_file_takes_the_environment_s_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As in Docker's env files: ``KEY`` alone passes the environment's value through, it is no error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("OPENAI_API_KEY\nMEDIASERVER_PORT=18127\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    monkeypatch.delenv("MEDIASERVER_PORT", raising=False)
    assert load_dotenv_file() is True
    assert os.environ["OPENAI_API_KEY"] == "sk-from-the-environment" and os.environ["MEDIASERVER_PORT"] == "18127"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://m.example/talk?token=SECRET123", "must be a ws:// or wss:// URL, not 'https://m.example/talk'"),
        ("ws://", "has no host: 'ws://'"),
        ("ws://m.example:99999/talk?token=SECRET123", "has a malformed host or port: 'ws://m.example:99999/talk'"),
        ("wss://user:SECRET123@m.example/talk", "has a user name or password in it (user:password@ before the host; "
         "the URL without them: 'wss://m.example/talk'): they would not be sent; put a token your model checks in the "
         "query instead (?token=...)"),  # (pcm has no key setting)
        ("ws://m.example:0/talk?token=SECRET123", "has port 0: 'ws://m.example:0/talk'"),
    ],
)
def test_config_model_urls_are_checked_at_start_without_showing_their_secrets(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"MEDIASERVER_PROVIDER": "pcm", "PCM_PROVIDER_URL": url})
    assert message in str(info.value) and "PCM_PROVIDER_URL" in str(info.value)
    assert "SECRET123" not in str(info.value)


@pytest.mark.parametrize("url", ["WSS://m.example/talk", "ws://[::1]:9000/x", "ws://m.example:/x", "wss://m.example/a%20b?q=@#f"])
def test_config_model_urls_that_are_fine(url: str) -> None:
    settings = Settings.from_env({"MEDIASERVER_PROVIDER": "pcm", "PCM_PROVIDER_URL": url})
    assert settings.pcm_provider_url == url


def test_config_repr_leaves_out_keys_tokens_and_urls_with_passwords() -> None:
    """repr(settings) may end up in a log line or a traceback."""
    settings = Settings(
        openai_api_key="sk-SECRET1", twilio_auth_token="SECRET2", database_url="postgresql://u:SECRET3@h/db",
        api_key="SECRET4", twilio_api_key_secret="SECRET5", pcm_provider_url="wss://m/talk?token=SECRET6",
        gemini_api_key="SECRET7", deepgram_api_key="SECRET8", assemblyai_api_key="SECRET9", elevenlabs_api_key="SECRETA",
        openai_realtime_url="wss://proxy.example/v1/realtime?key=SECRETC", twilio_api_base="https://u:SECRETD@api.example",
    )
    assert "SECRET" not in repr(settings) and "provider='echo'" in repr(settings)
    credentials = TwilioCredentials("AC" + "1" * 32, "AC" + "1" * 32, "SECRETB")
    assert "SECRET" not in repr(credentials)


def test_settings_that_do_nothing_as_configured_are_warned_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from mediaserver.__main__ import _warn_unused

    caplog.set_level("WARNING", logger="mediaserver")
    key = "k" * 16
    _warn_unused(Settings(api_key=key, agent_greeting="Hello!"))
    assert [r.getMessage() for r in caplog.records] == [
        "MEDIASERVER_API_KEY is set, but POST /calls will answer 503 until Twilio REST credentials are: "
        "TWILIO_ACCOUNT_SID with TWILIO_AUTH_TOKEN or an API key",
        "the echo agent has no voice of its own: AGENT_GREETING (and outbound greetings) are not spoken",
    ]
    caplog.clear()
    _warn_unused(Settings(provider="deepgram", deepgram_api_key="k", deepgram_think_provider="bogus"))
    [unknown] = [r.getMessage() for r in caplog.records]
    assert unknown.startswith("DEEPGRAM_THINK_PROVIDER='bogus' is not one Deepgram documents (anthropic, aws_bedrock, ")
    caplog.clear()
    _warn_unused(Settings(api_key=key, twilio_account_sid="AC" + "0" * 32, twilio_auth_token="t", agent_greeting="Hi",
                          provider="openai", openai_api_key="k"))
    _warn_unused(Settings(provider="deepgram", deepgram_api_key="k", deepgram_think_provider="anthropic"))
    assert caplog.records == []


def test_risky_security_settings_are_warned_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from mediaserver.__main__ import _warn_unused

    caplog.set_level("WARNING", logger="mediaserver")
    sid = "AC" + "0" * 32
    _warn_unused(Settings(api_key="short", twilio_account_sid=sid, twilio_auth_token="t",
                          transfer_numbers="+1*,+4420*,+15551234567"))  # fmt: skip
    short, broad = [r.getMessage() for r in caplog.records]
    assert short.startswith("MEDIASERVER_API_KEY is 5 characters: it guards POST /calls")
    assert broad.startswith("MEDIASERVER_TRANSFER_NUMBERS has +1*: the model may transfer a caller to any number")
    caplog.clear()
    _warn_unused(Settings(twilio_account_sid=sid, twilio_api_key_sid="SK" + "0" * 32, twilio_api_key_secret="s"))
    [dev] = [r.getMessage() for r in caplog.records]  # (REST credentials, no auth token: development mode)
    assert dev.startswith("Twilio REST credentials are set but TWILIO_AUTH_TOKEN is not: development mode")
    caplog.clear()
    _warn_unused(Settings(api_key="k" * 16, twilio_account_sid=sid, twilio_auth_token="t", transfer_numbers="+15551*"))
    assert caplog.records == []


def test_config_provider_names_are_taken_in_any_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert Settings.from_env({"MEDIASERVER_PROVIDER": " OpenAI ", "OPENAI_API_KEY": "k"}).provider == "openai"
    from mediaserver.__main__ import _parser

    assert _parser().parse_args(["serve", "--provider", "Gemini"]).provider == "gemini"


def test_config_credentials_in_a_keyed_providers_url_point_at_its_key_setting() -> None:
    with pytest.raises(ConfigError, match=r"OPENAI_REALTIME_URL has a user name .*give the provider's key in its own setting"):
        Settings.from_env({"MEDIASERVER_PROVIDER": "openai", "OPENAI_API_KEY": "k", "OPENAI_REALTIME_URL": "wss://u:p@h/x"})
