"""Settings: the one place that reads the environment.

Every setting has an environment variable (optionally from a ``.env`` file in
the working directory) and the ones changed most often a CLI flag; the CLI wins over the
environment, which wins over the built-in default.  ``Settings`` is frozen:
build it once at start and pass it down.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mediaserver._urls import redact
from mediaserver.logs import FORMATS as LOG_FORMATS
from mediaserver.logs import LEVELS as LOG_LEVELS
from mediaserver.protocol.twilio_events import is_twilio_sid
from mediaserver.security import configured_base, signature_bases

__all__ = ["PCM_RATES", "PROVIDERS", "REQUIRED", "ConfigError", "Settings", "env_name", "is_http_url", "load_dotenv_file"]

# Providers the server can bridge to; "echo" needs no network and no key.
PROVIDERS = ("echo", "openai", "gemini", "assemblyai", "deepgram", "elevenlabs", "pcm")

# The key (or other setting) each network provider cannot start without.
REQUIRED: dict[str, tuple[str, ...]] = {
    "openai": ("openai_api_key",),
    "gemini": ("gemini_api_key",),
    "assemblyai": ("assemblyai_api_key",),
    "deepgram": ("deepgram_api_key",),
    "elevenlabs": ("elevenlabs_agent_id",),
    "pcm": ("pcm_provider_url",),
}
PCM_RATES = (8000, 16000, 24000)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def _env_field(env: str, default: Any, doc: str) -> Any:
    # (keys, tokens and URLs that may hold a password stay out of repr(settings): a log line or a traceback)
    secret = env.endswith(("_KEY", "_TOKEN", "_SECRET")) or (
        env.endswith(("_URL", "_BASE")) and env not in ("MEDIASERVER_PUBLIC_URL", "MEDIASERVER_INSTANCE_URL")
    )
    return field(default=default, repr=not secret, metadata={"env": env, "doc": doc})


@dataclass(frozen=True, slots=True)
class Settings:
    provider: str = _env_field("MEDIASERVER_PROVIDER", "echo", " | ".join(PROVIDERS))
    host: str = _env_field("MEDIASERVER_HOST", "0.0.0.0", "address to listen on")
    port: int = _env_field("MEDIASERVER_PORT", 8080, "port to listen on")
    public_url: str | None = _env_field(
        "MEDIASERVER_PUBLIC_URL", None, "https://host as Twilio reaches us; default: from Host / X-Forwarded-*"
    )
    instance_url: str | None = _env_field(
        "MEDIASERVER_INSTANCE_URL",
        None,
        "https://host that reaches this instance directly, for its calls' streams and callbacks; default: the public URL",
    )
    twilio_account_sid: str | None = _env_field("TWILIO_ACCOUNT_SID", None, "AC...; checked against start events when set")
    twilio_auth_token: str | None = _env_field(
        "TWILIO_AUTH_TOKEN", None, "validates X-Twilio-Signature; unset = development mode"
    )
    openai_api_key: str | None = _env_field("OPENAI_API_KEY", None, "required for provider openai")
    openai_realtime_url: str = _env_field(
        "OPENAI_REALTIME_URL", "wss://api.openai.com/v1/realtime", "override for Azure, proxies and tests"
    )
    openai_realtime_model: str = _env_field("OPENAI_REALTIME_MODEL", "gpt-realtime-2.1", "model query parameter")
    openai_voice: str = _env_field("OPENAI_VOICE", "marin", "output voice")
    openai_audio: str = _env_field(
        "OPENAI_AUDIO_FORMAT", "pcmu", "pcmu (µ-law passthrough) | pcm24k (24 kHz PCM16 through the resampler)"
    )
    openai_turn_detection: str = _env_field("OPENAI_TURN_DETECTION", "server_vad", "server_vad | semantic_vad")
    openai_reasoning_effort: str | None = _env_field(
        "OPENAI_REASONING_EFFORT", None,
        "minimal | low | medium | high | xhigh: how much a reasoning model (gpt-realtime-2 and later) thinks before "
        "it answers; unset = the model's default",
    )  # fmt: skip
    openai_transcription_model: str = _env_field(
        "OPENAI_TRANSCRIPTION_MODEL",
        "gpt-live-transcribe",
        "transcribes the caller's words for the call records (billed by OpenAI); off = no caller transcript",
    )
    gemini_api_key: str | None = _env_field("GEMINI_API_KEY", None, "required for provider gemini")
    gemini_live_url: str = _env_field(
        "GEMINI_LIVE_URL",
        "wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
        "Gemini Live WebSocket endpoint; override for proxies and tests",
    )
    gemini_model: str = _env_field("GEMINI_MODEL", "gemini-3.8-live", "Live model id")
    gemini_voice: str = _env_field("GEMINI_VOICE", "Puck", "prebuilt voice name")
    assemblyai_api_key: str | None = _env_field("ASSEMBLYAI_API_KEY", None, "required for provider assemblyai")
    assemblyai_agent_url: str = _env_field(
        "ASSEMBLYAI_AGENT_URL", "wss://agents.assemblyai.com/v1/ws", "Voice Agent WebSocket endpoint"
    )
    assemblyai_voice: str | None = _env_field("ASSEMBLYAI_VOICE", None, "agent voice (provider default when unset)")
    deepgram_api_key: str | None = _env_field("DEEPGRAM_API_KEY", None, "required for provider deepgram")
    deepgram_agent_url: str = _env_field(
        "DEEPGRAM_AGENT_URL", "wss://agent.deepgram.com/v1/agent/converse", "Voice Agent WebSocket endpoint"
    )
    deepgram_listen_model: str = _env_field("DEEPGRAM_LISTEN_MODEL", "nova-3", "speech-to-text model")
    deepgram_think_provider: str = _env_field("DEEPGRAM_THINK_PROVIDER", "open_ai", "LLM provider type")
    deepgram_think_model: str = _env_field("DEEPGRAM_THINK_MODEL", "gpt-4o-mini", "LLM model")
    deepgram_speak_model: str = _env_field("DEEPGRAM_SPEAK_MODEL", "aura-2-thalia-en", "text-to-speech model")
    elevenlabs_api_key: str | None = _env_field(
        "ELEVENLABS_API_KEY", None, "for private agents (signed URL); public agents need only the agent id"
    )
    elevenlabs_agent_id: str | None = _env_field("ELEVENLABS_AGENT_ID", None, "required for provider elevenlabs")
    elevenlabs_agent_url: str = _env_field(
        "ELEVENLABS_AGENT_URL", "wss://api.elevenlabs.io/v1/convai/conversation", "Agents WebSocket endpoint"
    )
    pcm_provider_url: str | None = _env_field("PCM_PROVIDER_URL", None, "ws:// or wss:// URL of a PCM16 model (provider pcm)")
    pcm_provider_input_rate: int = _env_field("PCM_PROVIDER_INPUT_RATE", 16000, "8000 | 16000 | 24000: caller audio to the model")
    pcm_provider_output_rate: int = _env_field(
        "PCM_PROVIDER_OUTPUT_RATE", 16000, "8000 | 16000 | 24000: model audio to the caller"
    )
    api_key: str | None = _env_field(
        "MEDIASERVER_API_KEY", None, "protects POST /calls and GET /calls/{sid} (Bearer token); unset = those routes are off"
    )
    twilio_api_key_sid: str | None = _env_field("TWILIO_API_KEY_SID", None, "SK...; REST auth instead of the auth token")
    twilio_api_key_secret: str | None = _env_field("TWILIO_API_KEY_SECRET", None, "secret of TWILIO_API_KEY_SID")
    twilio_api_base: str = _env_field("TWILIO_API_BASE", "https://api.twilio.com", "Twilio REST base URL (tests override)")
    twilio_from_number: str | None = _env_field("TWILIO_FROM_NUMBER", None, "default caller id for outbound calls (E.164)")
    tools_module: str | None = _env_field("MEDIASERVER_TOOLS", None, "Python module whose @tool functions the agent may call")
    tool_timeout_s: float = _env_field("MEDIASERVER_TOOL_TIMEOUT_S", 10.0, "a tool call slower than this returns an error")
    transfer_numbers: str | None = _env_field(
        "MEDIASERVER_TRANSFER_NUMBERS",
        None,
        "comma-separated E.164 numbers or +prefix* patterns transfer_call may dial; unset = transfer_call is off",
    )
    data_dir: str = _env_field("MEDIASERVER_DATA_DIR", "data", "where the SQLite call records live")
    database_url: str | None = _env_field(
        "DATABASE_URL", None, "postgresql://... to keep call records in PostgreSQL instead of SQLite"
    )
    agent_instructions: str = _env_field(
        "AGENT_INSTRUCTIONS",
        "You are a helpful, concise voice assistant on a phone call. Keep answers short.",
        "system instructions for the agent",
    )
    agent_greeting: str | None = _env_field("AGENT_GREETING", None, "what the agent says first (optional)")
    failure_message: str = _env_field(
        "MEDIASERVER_FAILURE_MESSAGE", "Sorry, the assistant is not available right now. Please call again later.",
        "what Twilio says to a caller whose model failed (needs Twilio REST credentials); TwiML verbs if it starts "
        "with <; off = nothing, the call just ends",
    )  # fmt: skip
    stream_timeout_s: float = _env_field(
        "MEDIASERVER_STREAM_TIMEOUT_S", 15.0, "close a pre-opened model session if no stream arrives"
    )
    idle_timeout_s: float = _env_field(
        "MEDIASERVER_IDLE_TIMEOUT_S", 30.0, "end a call when Twilio sends nothing, or the model takes no audio"
    )
    max_call_s: float = _env_field("MEDIASERVER_MAX_CALL_S", 3600.0, "hard limit on a call's length")
    max_calls: int = _env_field(
        "MEDIASERVER_MAX_CALLS", 0, "calls at once (live, answered, or placed and ringing); more are turned away; 0 = no limit"
    )
    chunk_ms: int = _env_field(
        "MEDIASERVER_CHUNK_MS", 40, "model audio to Twilio in chunks of this many ms, a mark after each (20-200, step 20)"
    )
    connect_timeout_s: float = _env_field("MEDIASERVER_CONNECT_TIMEOUT_S", 10.0, "model WebSocket connect limit")
    model_ping_s: float = _env_field(
        "MEDIASERVER_MODEL_PING_S", 10.0,
        "ping a model silent this long; end the call if nothing comes back within as long again (0 = never)",
    )  # fmt: skip
    drain_s: float = _env_field("MEDIASERVER_DRAIN_S", 10.0, "graceful shutdown: how long live calls may finish")
    log_level: str = _env_field("MEDIASERVER_LOG_LEVEL", "INFO", "DEBUG | INFO | WARNING | ERROR | CRITICAL")
    log_format: str = _env_field("MEDIASERVER_LOG_FORMAT", "text", "text | json (one JSON object per line)")

    @property
    def development_mode(self) -> bool:
        """No Twilio auth token: webhooks and streams are not authenticated."""
        return not self.twilio_auth_token

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from ``environ`` (default ``os.environ``), then apply non-None overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or not raw.strip():  # (set but empty, or only spaces: unset)
                continue
            values[f.name] = _parse(f.name, f.metadata["env"], raw, f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def validated(self) -> Settings:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"MEDIASERVER_PROVIDER must be one of {', '.join(PROVIDERS)}, not {self.provider!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"MEDIASERVER_PORT must be 1-65535, not {self.port}")
        for needed in REQUIRED.get(self.provider, ()):
            if not getattr(self, needed):
                raise ConfigError(f"MEDIASERVER_PROVIDER={self.provider} needs {env_name(needed)}")
        for name in ("pcm_provider_input_rate", "pcm_provider_output_rate"):
            if getattr(self, name) not in PCM_RATES:
                raise ConfigError(f"{env_name(name)} must be 8000, 16000 or 24000, not {getattr(self, name)}")
        for name in ("openai_realtime_url", "gemini_live_url", "assemblyai_agent_url", "deepgram_agent_url",
                     "elevenlabs_agent_url", "pcm_provider_url"):
            url = getattr(self, name)
            if url is not None:
                _check_ws_url(env_name(name), url)
        if self.elevenlabs_agent_id is not None and not re.fullmatch(r"[\w-]+", self.elevenlabs_agent_id, re.ASCII):
            raise ConfigError(f"ELEVENLABS_AGENT_ID must be an agent id (letters, digits, _ and -), not {self.elevenlabs_agent_id[:60]!r}")
        from mediaserver import twiml
        from mediaserver.protocol.providers.openai import REASONING_EFFORTS

        try:
            twiml.failure(self.failure_message)
        except ValueError as exc:
            raise ConfigError(f"MEDIASERVER_FAILURE_MESSAGE: {exc}") from None
        if self.openai_reasoning_effort is not None and self.openai_reasoning_effort not in REASONING_EFFORTS:
            raise ConfigError(
                f"OPENAI_REASONING_EFFORT must be {', '.join(REASONING_EFFORTS[:-1])} or {REASONING_EFFORTS[-1]}, "
                f"not {self.openai_reasoning_effort!r}"
            )
        if self.openai_audio not in ("pcmu", "pcm24k"):
            raise ConfigError(f"OPENAI_AUDIO_FORMAT must be pcmu or pcm24k, not {self.openai_audio!r}")
        if self.openai_turn_detection not in ("server_vad", "semantic_vad"):
            raise ConfigError(
                f"OPENAI_TURN_DETECTION must be server_vad or semantic_vad, not {self.openai_turn_detection!r}"
            )
        if self.public_url is not None and not self.public_url.startswith(("https://", "http://")):
            raise ConfigError(f"MEDIASERVER_PUBLIC_URL must start with https:// (or http://), not {self.public_url!r}")
        for name in ("public_url", "instance_url"):
            if getattr(self, name) is not None:
                try:
                    configured_base(getattr(self, name), env_name(name))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        if self.transfer_numbers is not None:
            from mediaserver.tools.builtins import parse_transfer_numbers

            try:
                parse_transfer_numbers(self.transfer_numbers)
            except ValueError as exc:
                raise ConfigError(f"MEDIASERVER_TRANSFER_NUMBERS: {exc}") from None
        for name, prefix in (("twilio_account_sid", "AC"), ("twilio_api_key_sid", "SK")):
            sid = getattr(self, name)
            if sid is not None and not is_twilio_sid(sid, prefix):
                raise ConfigError(f"{env_name(name)} must be {prefix} followed by 32 hex digits, not {sid[:40]!r}")
        if bool(self.twilio_api_key_sid) != bool(self.twilio_api_key_secret):  # (half an API key: REST calls would fail)
            have, need = ("TWILIO_API_KEY_SID", "TWILIO_API_KEY_SECRET")[:: 1 if self.twilio_api_key_sid else -1]
            raise ConfigError(f"{have} needs {need}: set both for Twilio REST requests (or neither)")
        if self.twilio_api_key_sid and not self.twilio_account_sid:
            raise ConfigError("TWILIO_API_KEY_SID needs TWILIO_ACCOUNT_SID, the account the key belongs to")
        if self.twilio_from_number is not None:
            from mediaserver.tools.builtins import E164

            if not E164.match(self.twilio_from_number):
                raise ConfigError(
                    f"TWILIO_FROM_NUMBER must be an E.164 number (+ and 7-15 digits), not {self.twilio_from_number!r}"
                )
        if not is_http_url(self.twilio_api_base):
            raise ConfigError(f"TWILIO_API_BASE must be an http:// or https:// URL, not {self.twilio_api_base!r}")
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            scheme = self.database_url.partition("://")[0] if "://" in self.database_url else "(no scheme)"
            raise ConfigError(f"DATABASE_URL must be a postgresql:// URL, not {scheme}")  # (the URL may hold a password)
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"MEDIASERVER_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.log_format.lower() not in LOG_FORMATS:
            raise ConfigError(f"MEDIASERVER_LOG_FORMAT must be text or json, not {self.log_format!r}")
        if self.max_calls < 0:
            raise ConfigError(f"MEDIASERVER_MAX_CALLS must be 0 (no limit) or a number of calls, not {self.max_calls}")
        if not (20 <= self.chunk_ms <= 200 and self.chunk_ms % 20 == 0):
            raise ConfigError(f"MEDIASERVER_CHUNK_MS must be 20, 40, ... or 200, not {self.chunk_ms!r}")
        if not math.isfinite(self.model_ping_s) or not (self.model_ping_s == 0 or self.model_ping_s >= 1):
            raise ConfigError(
                f"MEDIASERVER_MODEL_PING_S must be 0 (never) or at least 1 (seconds), not {self.model_ping_s!r}"
            )
        for name in ("stream_timeout_s", "idle_timeout_s", "max_call_s", "connect_timeout_s", "drain_s", "tool_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{env_name(name)} must be a positive number of seconds, not {value!r}")
        return self

    @property
    def call_url(self) -> str | None:
        """The base of the URLs a call comes back to (its ``<Stream url>``, outbound callbacks): this instance's.

        ``MEDIASERVER_INSTANCE_URL`` when set, else ``MEDIASERVER_PUBLIC_URL``
        (None: from the request's ``Host`` / ``X-Forwarded-*``).
        """
        return self.instance_url or self.public_url

    @property
    def signed_url_bases(self) -> tuple[str | None, ...]:
        """The bases Twilio may sign a request to us under: the public URL, and this instance's URL if set."""
        return signature_bases(self.public_url, self.instance_url)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes).validated()

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting, for docs and --help."""
        return [(f.metadata["env"], repr(f.default), f.metadata["doc"]) for f in fields(cls)]


BUILD_SETTINGS = frozenset({"MEDIASERVER_ANNOTATE", "MEDIASERVER_NATIVE_FLAGS", "MEDIASERVER_ONLY"})  # setup.py's


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``MEDIASERVER_*`` variables that are no setting (a typo is ignored otherwise), each with the likeliest meant."""
    import difflib

    environ = os.environ if environ is None else environ
    known = [str(f.metadata["env"]) for f in fields(Settings)]
    unknown = []
    for name in sorted(environ):
        if name.startswith("MEDIASERVER_") and name not in known and name not in BUILD_SETTINGS:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            unknown.append((name, close[0] if close else None))
    return unknown



def _check_ws_url(env: str, url: str) -> None:
    """A ``ws://`` or ``wss://`` URL with a host and a valid port; the error never shows its query or userinfo."""
    try:
        parts = urlsplit(url)
        parts.port  # (raises for a port out of range)
    except ValueError:
        raise ConfigError(f"{env} has a malformed host or port: {redact(url)!r}") from None
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(f"{env} must be a ws:// or wss:// URL, not {redact(url)!r}")
    if not parts.hostname:
        raise ConfigError(f"{env} has no host: {redact(url)!r}")
    if parts.port == 0:
        raise ConfigError(f"{env} has port 0: {redact(url)!r}")
    if "@" in parts.netloc:
        raise ConfigError(
            f"{env} has a user name or password in it (user:password@ before the host; the URL without them: "
            f"{redact(url)!r}): they would not be sent; "
            + ("put a token your model checks in the query instead (?token=...)" if env == "PCM_PROVIDER_URL"
               else "give the provider's key in its own setting")
        )

def env_name(attr: str) -> str:
    """The environment variable of the setting ``attr`` (``port``: ``MEDIASERVER_PORT``)."""
    return next(str(f.metadata["env"]) for f in fields(Settings) if f.name == attr)


def is_http_url(url: str) -> bool:
    """An http(s) URL with a host and, if any, a valid port: one the server's HTTP client can request."""
    from mediaserver.transport.http import HttpError, parse_url

    try:
        parse_url(url)
    except HttpError:
        return False
    return True


def _parse(name: str, env: str, raw: str, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{env} must be a {'whole ' if kind is int else ''}number, not {raw!r}") from None
    if name == "provider":
        return raw.strip().lower()  # (OpenAI: as the log level and format, any case)
    return raw.strip()


def load_dotenv_file(path: str | os.PathLike[str] | None = None) -> bool:
    """Load ``KEY=value`` lines into ``os.environ``, without overriding what is set (and not empty).

    ``path`` None means ``.env`` if there is one, and ``""`` no file; a path
    given explicitly (``--env-file``) must exist.  A file that cannot be read or parsed is a
    :class:`ConfigError`, not a traceback.  A variable set but empty (as
    docker-compose passes through an unset ``${VAR}``) counts as unset, as it
    does for the settings themselves, so the file's value fills it in.
    """
    if path == "":
        return False
    required = path is not None
    path = Path(".env" if path is None else path)
    if not (path.exists() if required else path.is_file()):  # (/dev/null: an empty file, deliberately)
        if required:
            raise ConfigError(f"--env-file {str(path)!r}: no such file")
        return False
    if path.is_dir():
        raise ConfigError(f"--env-file {str(path)!r} is a directory, not a file of KEY=value lines")
    from dotenv.main import DotEnv
    from dotenv.parser import parse_stream

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc} (it must be a UTF-8 text file of KEY=value lines)") from None
    # A line python-dotenv cannot parse would be skipped with a warning naming no file, and the server would
    # start without that setting (on every interface, say, instead of the loopback asked for): refuse it.
    # (A bare KEY, no "=", parses: it sets nothing, and takes the environment's value, as in Docker's env files.)
    bad = [binding.original for binding in parse_stream(io.StringIO(text)) if binding.error]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(
            f"{str(path)!r} line {bad[0].line}: not KEY=value: {bad[0].string.strip()[:80]!r}{more}"
            " (quote values with spaces or # in them; close every quote)"
        )
    # override=False: a ${VAR} in the file takes the real environment's value first, as load_dotenv does
    values = DotEnv(None, stream=io.StringIO(text), interpolate=True, override=False).dict()
    loaded = False
    for key, value in values.items():
        if value is not None and not os.environ.get(key):
            os.environ[key] = value
            loaded = True
    return loaded
