"""What the simulated caller does: a list of steps, from a script file or the options.

Script files are plain text, one step per line (``#`` starts a comment)::

    pause 500            # 500 ms of silence
    say Hello, I would like to book a table.
    wait                 # silence until the agent has answered and gone quiet (10 s at most)
    play question.wav    # a WAV file, relative to the script's folder
    barge-in 800         # silence until the agent has been talking for 800 ms ...
    say Sorry, stop.     # ... then talk over it
    tone 440 500         # a 440 Hz sine for 500 ms

or JSON, a list of one-key objects with the same names::

    [{"say": "Hello"}, {"wait": 8000}, {"barge-in": 800}, {"tone": [440, 500]}, {"pause": 300}]

``wait [MS]`` and ``barge-in MS [TIMEOUT_MS]`` give up after the timeout
(default 10 000 ms) and go on with the next step.  Every length is a whole
number of milliseconds, at most :data:`MAX_MS` (an hour).  :func:`parse_script`
checks the syntax; :func:`prepare` turns ``say``/``play``/``tone`` into
8 kHz µ-law (:class:`Speak`), trimmed of leading and trailing silence.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediaserver.dial import audio

__all__ = [
    "MAX_MS",
    "Action",
    "BargeIn",
    "Pause",
    "Play",
    "Say",
    "ScriptError",
    "Speak",
    "Step",
    "Tone",
    "Wait",
    "load_script",
    "parse_script",
    "prepare",
]

DEFAULT_TIMEOUT_MS = 10_000
# The longest pause, tone, wait or barge-in delay: an hour, the server's default maximum call
# length (MEDIASERVER_MAX_CALL_S in mediaserver/config.py).  More is a typo, and would not be
# harmless: a tone is rendered before the call (8000 bytes a second).
MAX_MS = 3_600_000


class ScriptError(Exception):
    """A script that cannot be run; the message names the line or entry."""


@dataclass(frozen=True, slots=True)
class Say:
    text: str


@dataclass(frozen=True, slots=True)
class Play:
    path: Path


@dataclass(frozen=True, slots=True)
class Tone:
    freq_hz: float
    ms: int


@dataclass(frozen=True, slots=True)
class Pause:
    ms: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Silence until the agent has answered and has been quiet for ``quiet_ms``, or ``timeout_ms``."""

    timeout_ms: int = DEFAULT_TIMEOUT_MS
    quiet_ms: int = 500


@dataclass(frozen=True, slots=True)
class BargeIn:
    """Silence until agent audio has been playing for ``after_ms``, or ``timeout_ms``."""

    after_ms: int
    timeout_ms: int = DEFAULT_TIMEOUT_MS


@dataclass(frozen=True, slots=True)
class Speak:
    """Caller speech, 8 kHz µ-law."""

    ulaw: bytes
    label: str


Step = Say | Play | Tone | Pause | Wait | BargeIn
Action = Speak | Pause | Wait | BargeIn


def _ms(value: Any, where: str) -> int:
    """A length from a text script (a string) or JSON (a string or a number: ``1e3`` is fine; ``1.5``, ``true`` not)."""
    if isinstance(value, float) and value.is_integer():  # (inf and nan are not)
        value = int(value)
    ms: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        ms = value
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            ms = int(value)
    if ms is None:  # (a JSON script's value as JSON writes it: true, not Python's True)
        shown = repr(value) if isinstance(value, str) else json.dumps(value)
        raise ScriptError(f"{where}: {shown} is not a whole number of milliseconds")
    if ms < 0:
        raise ScriptError(f"{where}: milliseconds must not be negative")
    if ms > MAX_MS:
        raise ScriptError(f"{where}: a step may last at most {MAX_MS} ms (an hour)")
    return ms


def _step(name: str, args: Sequence[Any], where: str, base: Path) -> Step:
    name = name.lower().replace("_", "-")
    if name == "say":
        text = " ".join(str(a) for a in args).strip()
        if not text:
            raise ScriptError(f"{where}: say needs some text")
        return Say(text)
    if name == "play":
        if len(args) != 1:
            raise ScriptError(f"{where}: play needs one WAV file")
        return Play(base / str(args[0]))
    if name == "tone":
        if len(args) != 2:
            raise ScriptError(f"{where}: tone needs a frequency (Hz) and a length (ms)")
        if isinstance(args[0], bool):
            raise ScriptError(f"{where}: {args[0]!r} is not a frequency")
        try:
            freq = float(args[0])
        except (TypeError, ValueError):
            raise ScriptError(f"{where}: {args[0]!r} is not a frequency") from None
        return Tone(freq, _ms(args[1], where))
    if name == "pause":
        if len(args) != 1:
            raise ScriptError(f"{where}: pause needs a length in ms")
        return Pause(_ms(args[0], where))
    if name == "wait":
        if len(args) > 1:
            raise ScriptError(f"{where}: wait takes at most a timeout in ms")
        return Wait(_ms(args[0], where)) if args and args[0] is not None else Wait()
    if name == "barge-in":
        if len(args) not in (1, 2):
            raise ScriptError(f"{where}: barge-in needs a delay in ms (and optionally a timeout)")
        timeout = _ms(args[1], where) if len(args) == 2 else DEFAULT_TIMEOUT_MS
        return BargeIn(_ms(args[0], where), timeout)
    raise ScriptError(f"{where}: unknown step {name!r} (say, play, tone, pause, wait, barge-in)")


def parse_script(text: str, base: Path = Path(".")) -> list[Step]:
    """Steps from a text or JSON script (see the module docstring)."""
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise ScriptError(f"invalid JSON: {exc}") from None
        steps: list[Step] = []
        for index, entry in enumerate(entries):
            where = f"entry {index + 1}"
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ScriptError(f"{where}: each entry is an object with one key, like {{\"say\": \"hello\"}}")
            [(name, value)] = entry.items()
            args: list[Any] = value if isinstance(value, list) else [value]
            if name == "say":
                args = [value]
            steps.append(_step(str(name), args, where, base))
        return steps
    steps = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip() if not line.lstrip().lower().startswith("say") else line.strip()
        if not line:
            continue
        name, _, rest = line.partition(" ")
        args = [rest] if name.lower() == "say" else rest.split()
        steps.append(_step(name, args, f"line {number}", base))
    return steps


def load_script(path: str | Path) -> list[Step]:
    """Parse the script file at ``path`` (``play`` files are relative to its folder)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"cannot read script {path}: {exc}") from None
    try:
        return parse_script(text, file.parent)
    except ScriptError as exc:
        raise ScriptError(f"{path}: {exc}") from None


def prepare(steps: Sequence[Step]) -> list[Action]:
    """Render the audio of every step once (raises :class:`audio.AudioError`)."""
    actions: list[Action] = []
    spoken: dict[Step, bytes] = {}
    for step in steps:
        if isinstance(step, (Pause, Wait, BargeIn)):
            actions.append(step)
            continue
        if step not in spoken:
            if isinstance(step, Say):
                raw = audio.to_phone(audio.synthesize(step.text))
            elif isinstance(step, Play):
                raw = audio.to_phone(audio.read_wav(step.path))
            else:
                raw = audio.tone(step.freq_hz, step.ms)
            spoken[step] = raw if isinstance(step, Tone) else audio.trim(raw)
        if not spoken[step]:
            raise audio.AudioError(f"{_silent(step)}: nothing to say")
        actions.append(Speak(spoken[step], _label(step)))
    return actions


def _silent(step: Say | Play | Tone) -> str:
    """What is silent, in words that fit both a script step and ``--say``/``--wav``."""
    if isinstance(step, Say):
        return f"the text {step.text[:40]!r} makes no sound"
    if isinstance(step, Play):
        return f"the WAV file {step.path} is silent"
    return f"{_label(step)} is silent"


def _label(step: Say | Play | Tone) -> str:
    if isinstance(step, Say):
        return f"say {step.text[:40]!r}"
    if isinstance(step, Play):
        return f"play {step.path}"
    return f"tone {step.freq_hz:g} Hz {step.ms} ms"
