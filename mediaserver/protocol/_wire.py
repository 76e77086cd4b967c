"""What every sans-I/O core here does the same way: JSON in and out, typed field
access, base64, the event queue and the ERROR-state guard.

Private to :mod:`mediaserver.protocol`.  The cores (``twilio.py`` and
``providers/*.py``) differ in their protocols, not in how they read a JSON
object or die after a protocol error, so that part lives here once, with one
wording for every error:

* ``"{where}: missing 'key'"`` when a required key is absent;
* ``"{where}: 'key' must be <kind>, got <value>"`` when it has the wrong type
  (the value is cut to 40 characters, the raw message to 80).

``where`` names the place in the peer's message (``"reply.audio"``,
``"start.mediaFormat"``), so the error says exactly which field was wrong.
Every error about the peer's data is a :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import binascii
import enum
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Final, Generic, ParamSpec, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from .errors import CLOSE_MESSAGE_TOO_BIG, LocalProtocolError, RemoteProtocolError

__all__ = [
    "REPLY_HISTORY",
    "JsonObject",
    "ProtocolEnum",
    "SansIOCore",
    "b64_field",
    "b64decode",
    "b64encode",
    "dumps",
    "field",
    "flag_field",
    "int_field",
    "load_object",
    "obj_field",
    "object_list_field",
    "optional_str_field",
    "require_text",
    "str_field",
    "table_transition",
    "text_field",
    "with_query",
]

JsonObject = dict[str, Any]
"""A decoded JSON object (values are whatever ``json.loads`` produced)."""


def with_query(url: str, name: str, value: str) -> str:
    """``url`` with ``name=value`` added after the query it has (an Azure ``api-version``, a proxy's token).

    A URL whose query names ``name`` already is left as it is: the URL given is the more specific.
    """
    parts = urlsplit(url)
    if any(pair.partition("=")[0] == name for pair in parts.query.split("&")):
        return url
    added = f"{name}={quote(value, safe='')}"
    return urlunsplit(parts._replace(query=f"{parts.query}&{added}" if parts.query else added))


class ProtocolEnum(enum.Enum):
    """A core's states or inputs, hashed by identity.

    Members are singletons compared by identity, so the object hash is
    the right one; ``enum.Enum``'s own ``__hash__`` is a Python-level call,
    paid twice by every lookup in a transition table, and a core makes one
    transition per message.
    """

    __hash__ = object.__hash__


StateT = TypeVar("StateT", bound=enum.Enum)
EventT = TypeVar("EventT")
InputT = TypeVar("InputT", bound=enum.Enum)
P = ParamSpec("P")
R = TypeVar("R")

_MISSING: Final = object()

# Reply items whose audio accounting a core keeps (the most recently started):
# an item a caller barges in on is among the last few, and the bound keeps a
# long call's per-reply bookkeeping from growing with every reply.
REPLY_HISTORY: Final = 256


# --------------------------------------------------------------------- encoding


def dumps(body: Mapping[str, object]) -> str:
    """Compact JSON text (no spaces, UTF-8 kept as is), the form every core sends."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def b64encode(payload: bytes) -> str:
    """Standard padded base64 of ``payload`` as ASCII text, without a newline."""
    return binascii.b2a_base64(payload, newline=False).decode("ascii")


def b64decode(data: str, where: str, *, urlsafe: bool = False) -> bytes:
    """Strict standard base64 (``urlsafe``: the ``-_`` alphabet is accepted too).

    Raises :class:`RemoteProtocolError` naming ``where`` on anything else
    (bad padding, characters outside the alphabet, non-ASCII).
    """
    standard = data.replace("-", "+").replace("_", "/") if urlsafe else data
    try:
        return binascii.a2b_base64(standard, strict_mode=True)
    except ValueError:  # binascii.Error, and non-ASCII str
        raise RemoteProtocolError(f"{where}: invalid base64 {data!r:.40}") from None


# ---------------------------------------------------------------------- parsing


def require_text(message: str | bytes, peer: str) -> str:
    """``message`` if it is a text frame; a binary frame from a text-only ``peer`` is refused."""
    if not isinstance(message, str):
        raise RemoteProtocolError(f"{peer} sent a binary frame; it uses JSON text frames")
    return message


def load_object(text: str, *, tag: str | None = "type", max_bytes: int | None = None) -> JsonObject:
    """Parse one JSON text message that must be an object.

    ``tag`` names the key that must hold a string (the message kind: ``type``
    for most vendors, ``event`` for Twilio); ``None`` skips that check.
    ``max_bytes`` bounds the message's UTF-8 size before it is parsed (error
    close-code hint 1009).
    """
    if max_bytes is not None:
        size = len(text)
        if size > max_bytes or (size * 4 > max_bytes and not text.isascii() and len(text.encode("utf-8")) > max_bytes):
            raise RemoteProtocolError(
                f"message of {len(text.encode('utf-8'))} bytes exceeds the {max_bytes}-byte limit",
                close_code_hint=CLOSE_MESSAGE_TOO_BIG,
            )
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        raise RemoteProtocolError(f"message is not valid JSON: {text!r:.80}") from None
    if type(msg) is not dict:
        raise RemoteProtocolError(f"message is not a JSON object: {text!r:.80}")
    if tag is not None and type(msg.get(tag)) is not str:
        raise RemoteProtocolError(f"message has no string {tag!r}: {text!r:.80}")
    return msg


# ------------------------------------------------------------- field accessors


def _wrong(where: str, key: str, kind: str, value: object) -> RemoteProtocolError:
    return RemoteProtocolError(f"{where}: {key!r} must be {kind}, got {value!r:.40}")


def field(obj: JsonObject, key: str, where: str) -> Any:
    """The value of a required key (any JSON type, ``null`` included)."""
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise RemoteProtocolError(f"{where}: missing {key!r}")
    return value


def str_field(obj: JsonObject, key: str, where: str) -> str:
    """A required, non-empty string (ids, names)."""
    value = field(obj, key, where)
    if type(value) is not str or not value:
        raise _wrong(where, key, "a non-empty string", value)
    return value


def text_field(obj: JsonObject, key: str, where: str) -> str:
    """A required string that may be empty (transcripts, base64 audio)."""
    value = field(obj, key, where)
    if type(value) is not str:
        raise _wrong(where, key, "a string", value)
    return value


def optional_str_field(obj: JsonObject, key: str, where: str) -> str | None:
    """A string, or ``None`` when the key is absent or ``null``."""
    value = obj.get(key)
    if value is not None and type(value) is not str:
        raise _wrong(where, key, "a string or null", value)
    return value


def int_field(obj: JsonObject, key: str, where: str) -> int:
    """A required non-negative integer (``true``, ``1.0`` and ``"1"`` are refused)."""
    value = field(obj, key, where)
    if type(value) is not int or value < 0:
        raise _wrong(where, key, "a non-negative integer", value)
    return value


def flag_field(obj: JsonObject, key: str, where: str) -> bool:
    """An optional boolean; absent or ``null`` is ``False``."""
    value = obj.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise _wrong(where, key, "a boolean", value)
    return value


def obj_field(obj: JsonObject, key: str, where: str) -> JsonObject:
    """A required JSON object."""
    value = field(obj, key, where)
    if type(value) is not dict:
        raise _wrong(where, key, "an object", value)
    return value


def object_list_field(obj: JsonObject, key: str, where: str) -> list[JsonObject]:
    """A required list whose every element is a JSON object."""
    value = field(obj, key, where)
    if type(value) is not list or any(type(element) is not dict for element in value):
        raise _wrong(where, key, "a list of objects", value)
    return value


def b64_field(obj: JsonObject, key: str, where: str, *, urlsafe: bool = False) -> bytes:
    """A required base64 string, decoded (see :func:`b64decode`)."""
    return b64decode(text_field(obj, key, where), f"{where}.{key}", urlsafe=urlsafe)


# ------------------------------------------------------------------ state table


def table_transition(
    table: Mapping[tuple[StateT, InputT], StateT],
    state: StateT,
    what: InputT,
    *,
    inbound: bool,
    peer: str = "server",
) -> StateT:
    """The state after input ``what``; raise if ``table`` has no such (state, input) pair.

    An illegal inbound input is the peer's fault (:class:`RemoteProtocolError`,
    ``"<peer> sent <input> in state <STATE>"``); an illegal outbound one is
    ours (:class:`LocalProtocolError`).  The input enum's value is its name on
    the wire.
    """
    try:
        return table[state, what]
    except KeyError:
        if inbound:
            raise RemoteProtocolError(f"{peer} sent {what.value} in state {state.name}") from None
        raise LocalProtocolError(f"cannot send {what.value} in state {state.name}") from None


# ------------------------------------------------------------------- core base


class SansIOCore(Generic[StateT, EventT]):
    """Explicit state, an event queue and the ERROR-state guard of a sans-I/O core.

    A core subclasses this with its own state enum and event type, calls
    ``super().__init__(initial, error, new=...)`` and implements
    :meth:`_parse_events`.  Then:

    * :meth:`receive_message` parses one message into queued events; if the
      core is still in its ``new`` state (configuration not sent yet) that is
      a :class:`LocalProtocolError`.
    * :meth:`events` drains the queue, oldest first.
    * :meth:`_guarded` runs any other entry point (``send``,
      ``initial_messages``); as with ``receive_message``, an exception moves
      the core to its error state, after which every call raises
      :class:`LocalProtocolError` (h11's rule).
    """

    _DEAD_MESSAGE: ClassVar[str] = "the session is dead after an earlier protocol error"

    def __init__(self, initial: StateT, error: StateT, *, new: StateT | None = None) -> None:
        self._state: StateT = initial
        self._error_state = error
        self._new_state = new
        self._events: deque[EventT] = deque()

    @property
    def state(self) -> StateT:
        """Where the core is in its protocol (its own enum; the error state is final)."""
        return self._state

    def _check_alive(self) -> None:
        if self._state is self._error_state:
            raise LocalProtocolError(self._DEAD_MESSAGE)

    def _guarded(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)`` on a live core; any exception kills the core and propagates."""
        self._check_alive()
        try:
            return fn(*args, **kwargs)
        except BaseException:
            self._state = self._error_state
            raise

    def _begin(self, next_state: StateT) -> None:
        """Leave the ``new`` state (``initial_messages()``); a second call kills the core."""
        self._check_alive()
        if self._state is not self._new_state:
            self._state = self._error_state
            raise LocalProtocolError("initial_messages() called twice")
        self._state = next_state

    def receive_message(self, message: str | bytes) -> None:
        """Feed one WebSocket message from the peer; raises on bad input."""
        self._check_alive()
        try:
            if self._state is self._new_state:
                raise LocalProtocolError("message received before initial_messages()")
            self._events.extend(self._parse_events(message))
        except BaseException:
            self._state = self._error_state
            raise

    def _parse_events(self, message: str | bytes) -> Iterable[EventT]:
        """The events one message means (at least one); raise on bad input."""
        raise NotImplementedError

    def events(self) -> Iterator[EventT]:
        """Yield and remove the queued events, oldest first."""
        self._check_alive()
        events = self._events
        while events:
            yield events.popleft()
