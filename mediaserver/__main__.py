"""Command line: ``mediaserver serve`` (also ``python -m mediaserver``)."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from mediaserver import __version__
from mediaserver._urls import local_base
from mediaserver.config import PROVIDERS, ConfigError, Settings, env_name, load_dotenv_file, unknown_settings
from mediaserver.logs import configure as configure_logs

log = logging.getLogger("mediaserver")

# Subcommands that live in their own modules: each module defines
# ``configure(parser: argparse.ArgumentParser) -> None`` (its arguments and
# help) and ``main(args: argparse.Namespace) -> int`` (the exit status).
# ``serve`` and ``settings`` are defined here.  One line per command.
_COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "dial": ("mediaserver.dial.cli", "place a simulated Twilio call against a running server and report what the caller experienced"),
    "calls": ("mediaserver.records.cli", "list recent calls, or show one with its transcript"),
    "call": ("mediaserver.outbound_cli", "place an outbound call: the agent calls a phone number and speaks first"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mediaserver", description="Bridge Twilio calls to realtime speech models.")
    parser.add_argument("--version", action="version", version=f"mediaserver {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the server (the default command)")
    serve.add_argument("--host", help="address to listen on (MEDIASERVER_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (MEDIASERVER_PORT, default 8080)")
    serve.add_argument("--provider", type=str.lower, choices=PROVIDERS, help="model provider (MEDIASERVER_PROVIDER, default echo)")
    serve.add_argument("--public-url", help="https://host Twilio reaches us at (MEDIASERVER_PUBLIC_URL)")
    serve.add_argument(
        "--instance-url",
        help="https://host that reaches this instance directly, when several share the public URL (MEDIASERVER_INSTANCE_URL)",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL (MEDIASERVER_LOG_LEVEL, default INFO)")
    serve.add_argument("--log-format", type=str.lower, choices=("text", "json"), help="text or json lines (MEDIASERVER_LOG_FORMAT, default text)")
    serve.add_argument("--env-file", help="read settings from this file (default: .env, if there is one; '' for none)")
    sub.add_parser("settings", help="list every setting with its environment variable and default")
    for name, (module, summary) in _COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary)
        importlib.import_module(module).configure(command)
    return parser


def _command() -> str:
    """How to run ``mediaserver`` from here: the bare name if it is on PATH, else this environment's script (as
    ``make run`` starts it, from a virtual environment that is not activated)."""
    script = Path(sys.executable).parent / "mediaserver"
    found = shutil.which("mediaserver")
    if found is not None and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "mediaserver"
    if script.exists():
        try:
            return str(script.absolute().relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return f"{sys.executable} -m mediaserver"


def _print_next_steps(settings: Settings, binds: Sequence[str]) -> None:
    port = settings.port
    local = local_base(settings.host, settings.port)
    lines = [
        f"mediaserver {__version__}: provider {settings.provider}, listening on {', '.join(binds)}"
        + (f", at most {settings.max_calls} calls at once (MEDIASERVER_MAX_CALLS)" if settings.max_calls else ""),
        "Next steps:",
        *(
            []
            if settings.public_url
            else [f"  * expose the port publicly (for example: ngrok http {port}) and set MEDIASERVER_PUBLIC_URL"]
        ),
        *(
            ["  * set TWILIO_AUTH_TOKEN (in the environment or .env) so that only Twilio's signed requests are served"]
            if settings.development_mode
            else []
        ),
        "  * in the Twilio console, set your number's voice webhook (HTTP POST) to "
        f"{(settings.public_url or 'https://<your-public-host>').rstrip('/')}/twiml",
        f"  * health check: curl {local}/healthz (Prometheus: /metrics)",
        *(
            [f"  * calls this instance answers come back to {settings.instance_url} (MEDIASERVER_INSTANCE_URL): route it here"]
            if settings.instance_url
            else []
        ),
        f'  * try a call without a phone: {_command()} dial {local}/twiml --say "hello there"',
        f"  * every setting: {_command()} settings (another port, say: MEDIASERVER_PORT=8081, in the environment or .env)",
    ]
    if settings.provider == "echo":
        lines.append("  * the echo agent repeats what the caller says; set MEDIASERVER_PROVIDER (openai, gemini, ...) for a model")
    print("\n".join(lines), flush=True)


def freeze_startup_objects() -> int:
    """Move everything that exists after start-up out of the garbage collector's way; how many objects.

    The modules, the app and Hypercorn (about 57 000 objects) live as long as
    the process, yet every full collection would walk all of them, pausing
    every call; frozen, a collection walks only the calls' own objects.
    Garbage is collected first, so nothing dead is kept.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# serve's flags: each sets the Settings field of its name (--public-url: public_url)
_FLAGS = ("host", "port", "provider", "public_url", "instance_url", "log_level", "log_format")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # (here, not at the interpreter's exit: a closed pipe must meet the handler below)
        return status
    except BrokenPipeError:
        # Whoever read our output went away (`mediaserver calls | head -3`): stop quietly, as other command-line
        # tools do, with the status of a process SIGPIPE ended; stdout goes nowhere now, so the interpreter's own
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _first_word(words: Sequence[str]) -> str | None:
    """The first word that is not a flag or a flag's value (serve's flags all take one), if any."""
    at = 0
    while at < len(words):
        if not words[at].startswith("-"):
            return words[at]
        at += 1 if "=" in words[at] else 2
    return None


def _main(argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    first = words[0] if words else ""
    if (
        first.startswith("-")
        and first not in ("-h", "--help")
        and not (len(first) > 2 and "--version".startswith(first))  # (argparse takes --vers for --version)
        and _first_word(words) is None
    ):
        words.insert(0, "serve")  # `mediaserver --port 8081`: serve is the default command, flags and all
    args = _parser().parse_args(words)
    if args.command in _COMMANDS:
        return int(importlib.import_module(_COMMANDS[args.command][0]).main(args))
    if args.command == "settings":
        for env, default, doc in Settings.describe():
            print(f"{env:32} {default:42} {doc}")
        return 0
    flags = {name: getattr(args, name, None) for name in _FLAGS}
    try:
        load_dotenv_file(getattr(args, "env_file", None))
        settings = Settings.from_env(**flags)
    except ConfigError as exc:
        message = str(exc)
        for name, value in flags.items():  # a value given as a flag: name the flag, not only the variable
            env = env_name(name)
            flag = f"--{name.replace('_', '-')}"
            if value is not None and message.startswith(env + " "):
                message = f"{flag} ({env}){message[len(env):]}"
            elif value is not None and message.startswith(env + "="):  # "MEDIASERVER_PROVIDER=openai needs ..."
                setting, _, why = message.partition(" ")
                message = f"{flag} {setting[len(env) + 1:]} ({env}) {why}"
        print(f"mediaserver: configuration error: {message}", file=sys.stderr)
        return 2
    configure_logs(settings.log_level, settings.log_format)  # (before the tools load: they may log a warning)
    for name, meant in unknown_settings():
        log.warning("%s is not a setting: ignored%s", name, f" (did you mean {meant}?)" if meant else "")
    from mediaserver.tools import load_toolset

    try:
        load_toolset(settings)  # MEDIASERVER_TOOLS must import before we take calls
    except ConfigError as exc:
        print(f"mediaserver: configuration error: {exc}", file=sys.stderr)
        return 2
    _warn_unused(settings)
    if settings.development_mode:
        log.warning(
            "DEVELOPMENT MODE: TWILIO_AUTH_TOKEN is not set, so webhooks and media streams are NOT authenticated. "
            "Anyone who finds this server can open model sessions on your account. Set TWILIO_AUTH_TOKEN in production."
        )
    elif settings.public_url is None:
        log.warning(
            "MEDIASERVER_PUBLIC_URL is not set, so webhook signatures are checked against the URL rebuilt from the "
            "Host and X-Forwarded-* headers, which clients choose: a request signed for another server of your "
            "Twilio account would pass here too. Set MEDIASERVER_PUBLIC_URL in production."
        )

    import trio

    from mediaserver.server import ListenError, serve
    from mediaserver.transport.tls import client_context

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, settings)
            _print_next_steps(settings, binds)
            client_context()  # the CA bundle loaded now, not in the event loop at the first call's model connection
            freeze_startup_objects()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        refused, rest = group.split(ListenError)
        if refused is None:
            raise
        if settings.log_format.lower() == "json":
            log.error("%s", _leaf(refused))
        else:
            print(f"mediaserver: {_leaf(refused)}", file=sys.stderr)
        if rest is not None:  # anything else that went wrong at the same time is not hidden
            raise rest from None
        return 2
    return 0


def _warn_unused(settings: Settings) -> None:
    """Settings that do nothing as configured: a warning at start, not a surprise on a call."""
    from mediaserver.twilio_rest import TwilioCredentials

    has_rest = TwilioCredentials.from_settings(settings) is not None
    if settings.api_key and not has_rest:
        log.warning(
            "MEDIASERVER_API_KEY is set, but POST /calls will answer 503 until Twilio REST credentials are: "
            "TWILIO_ACCOUNT_SID with TWILIO_AUTH_TOKEN or an API key"
        )
    if settings.public_url is not None:
        _warn_public_url(settings.public_url)
    if settings.api_key and len(settings.api_key) < MIN_API_KEY_CHARS:
        log.warning(
            "MEDIASERVER_API_KEY is %d characters: it guards POST /calls (calls billed to your account) and the "
            "call records; use a random one of %d or more (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')",
            len(settings.api_key), MIN_API_KEY_CHARS,
        )  # fmt: skip
    if settings.development_mode and has_rest:
        log.warning(
            "Twilio REST credentials are set but TWILIO_AUTH_TOKEN is not: development mode, where anyone can start "
            "a session, while transfers and failure messages act on real calls through REST; set TWILIO_AUTH_TOKEN"
        )
    if settings.transfer_numbers:
        from mediaserver.tools.builtins import parse_transfer_numbers

        for entry in parse_transfer_numbers(settings.transfer_numbers):
            if entry.endswith("*") and len(entry) - 2 < MIN_PREFIX_DIGITS:
                log.warning(
                    "MEDIASERVER_TRANSFER_NUMBERS has %s: the model may transfer a caller to any number that starts "
                    "so, premium-rate ones included; list numbers, or prefixes of %d digits or more",
                    entry, MIN_PREFIX_DIGITS,
                )  # fmt: skip
    if settings.provider != "echo" and not has_rest:
        from mediaserver import twiml

        try:
            spoken = twiml.failure(settings.failure_message) is not None
        except ValueError:  # (refused by the settings' own check before this runs)
            spoken = False
        if spoken:
            log.info(
                "MEDIASERVER_FAILURE_MESSAGE is not spoken without Twilio REST credentials (TWILIO_ACCOUNT_SID with "
                "TWILIO_AUTH_TOKEN or an API key): a caller whose model fails hears silence, then the line ends"
            )
    if settings.provider == "echo" and settings.agent_greeting:
        log.warning("the echo agent has no voice of its own: AGENT_GREETING (and outbound greetings) are not spoken")
    if settings.provider == "deepgram":
        from mediaserver.protocol.providers.deepgram import THINK_PROVIDERS

        if settings.deepgram_think_provider not in THINK_PROVIDERS:
            log.warning(
                "DEEPGRAM_THINK_PROVIDER=%r is not one Deepgram documents (%s): if Deepgram does not know it either, "
                "every call's session will be refused", settings.deepgram_think_provider, ", ".join(sorted(THINK_PROVIDERS)),
            )


MIN_API_KEY_CHARS = 16  # a shorter MEDIASERVER_API_KEY is warned about at start
MIN_PREFIX_DIGITS = 4  # a transfer prefix with fewer digits (+1*, +44*, +449*) is warned about at start

# The routes Twilio or a client is pointed at (every POST route, and the Media Stream): a public URL that ends in one
# is a webhook URL given where the base is wanted.  (Kept here, not read from the app, so that the check costs no
# import of Quart; tests/test_config.py checks it against the app's routes.)
_ROUTES = ("/twiml", "/media-stream", "/outbound-twiml", "/call-status", "/calls")


def _warn_public_url(public_url: str) -> None:
    """A ``MEDIASERVER_PUBLIC_URL`` the server takes but real calls would not work with: a warning at start."""
    base = urlsplit(public_url)
    host = base.netloc.rpartition("@")[2]  # (a user name and password in it are not for the log)
    shown = f"{base.scheme}://{host}{base.path.rstrip('/')}"
    if base.scheme == "http":
        log.warning(
            "MEDIASERVER_PUBLIC_URL is http://: the TwiML then points Twilio at ws://%s%s, and Twilio takes only "
            "wss:// Media Streams (its error 31922), so real calls fail; use https:// (http:// suits local tests "
            "with mediaserver dial)", host, f"{base.path.rstrip('/')}/media-stream",
        )  # fmt: skip
    for route in _ROUTES:
        if shown.endswith(route):
            log.warning(
                "MEDIASERVER_PUBLIC_URL ends in %s: it is this server's base URL, and the routes are added to it "
                "(the voice webhook would be %s/twiml); did you mean %s?", route, shown, shown[: -len(route)],
            )  # fmt: skip
            break


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception that is not a group (nurseries nest their groups)."""
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first


if __name__ == "__main__":
    sys.exit(main())
