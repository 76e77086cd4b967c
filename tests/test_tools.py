"""Tools: schema from type hints and docstrings, loading, the runner, and tools on live calls.

The first part tests :mod:`mediaserver.tools` directly.  The second runs the
real server on loopback with the OpenAI fake (every client message is
validated by the ``openai`` SDK's type adapter, every server message is an
SDK model) and, for transfers, the fake Twilio REST API: a tool call round
trip, a timeout and an exception that leave the call running, ``end_call``
after the goodbye has played, ``transfer_call``, and keypad digits reaching
the model as text and a tool as an awaitable.
"""

from __future__ import annotations

import re

import itertools
import logging
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Optional

import pytest
import trio
from openai.types.realtime import (
    ConversationItemCreateEvent,
    RealtimeResponse,
    ResponseCreatedEvent,
    ResponseCreateEvent,
    ResponseDoneEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseOutputItemDoneEvent,
)
from openai.types.realtime.realtime_conversation_item_function_call import RealtimeConversationItemFunctionCall
from openai.types.realtime.realtime_conversation_item_function_call_output import (
    RealtimeConversationItemFunctionCallOutput,
)
from openai.types.realtime.realtime_conversation_item_user_message import RealtimeConversationItemUserMessage

from mediaserver.config import ConfigError, Settings
from mediaserver.protocol.providers.base import SendText
from mediaserver.protocol.providers.openai import OpenAIRealtimeConfig, OpenAIRealtimeSession
from mediaserver.tools import CallContext, ToolError, ToolSet, load_module_tools, load_toolset, tool
from mediaserver.tools.builtins import BUILTINS, END_CALL_STATUS, parse_transfer_numbers, transfer_tool
from mediaserver.tools import runner as runner_module
from mediaserver.tools.runner import MAX_ERROR_CHARS

from tests.fakes import FakeRealtimeSession, fail_after, to_ulaw, tone, validate_client_event
from tests.test_app import fake_openai, openai_settings, phone_call, running
from tests.twilio_rest_fake import ACCOUNT_SID, AUTH_TOKEN, TwilioError, fake_rest

# ------------------------------------------------------------------ schema


def test_tools_schema_from_hints_and_docstring() -> None:
    @tool
    async def book_table(
        name: str,
        party: int,
        when: Literal["lunch", "dinner"],
        budget: float | None,
        notes: list[str],
        call: CallContext,
        vegetarian: bool = False,
        phone: Optional[str] = None,
    ) -> dict[str, str]:
        """Book a table at the restaurant.

        Only for parties of up to 12.

        Args:
            name: Who the booking is for.
            party (int): How many people,
                children included.
            when: Which sitting.
            notes: Anything the kitchen should know.
            vegetarian: Whether everyone is vegetarian.

        Returns:
            The booking reference.
        """
        return {}

    assert book_table.name == "book_table"
    assert book_table.description == "Book a table at the restaurant."
    assert book_table.context_parameter == "call"
    assert book_table.parameters == {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "Who the booking is for."},
            "party": {"type": "integer", "description": "How many people, children included."},
            "when": {"type": "string", "enum": ["lunch", "dinner"], "description": "Which sitting."},
            "budget": {"type": "number"},
            "notes": {"type": "array", "items": {"type": "string"}, "description": "Anything the kitchen should know."},
            "vegetarian": {"type": "boolean", "description": "Whether everyone is vegetarian."},
            "phone": {"type": "string"},
        },
        "required": ["name", "party", "when", "notes"],
    }
    spec = book_table.spec
    assert (spec.name, spec.description, dict(spec.parameters)) == (
        "book_table",
        "Book a table at the restaurant.",
        book_table.parameters,
    )


def test_tools_decorator_options_and_plain_calls() -> None:
    @tool(name="lookup-order", description="Find an order.")
    def lookup(order_id: str) -> str:
        return f"order {order_id}"

    assert lookup.name == "lookup-order" and lookup.description == "Find an order."
    assert lookup("42") == "order 42"  # still an ordinary function
    assert lookup.parameters == {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
    assert lookup.spec.irreversible is False  # (the default: the provider may call it speculatively)

    @tool(irreversible=True)
    def cancel_order(order_id: str) -> str:
        """Cancel an order."""
        return "cancelled"

    assert cancel_order.spec.irreversible is True
    # the built-ins that act on the call cannot be undone either
    assert BUILTINS["end_call"].spec.irreversible and transfer_tool(("+15551234567",)).spec.irreversible


@pytest.mark.parametrize(
    ("define", "message"),
    [
        (lambda: tool(lambda x: x), r"tool <lambda>|letters, digits"),
        (lambda: tool(_no_doc), r"tool _no_doc: give it a docstring"),
        (lambda: tool(_untyped), r"tool _untyped, parameter x: needs a type annotation"),
        (lambda: tool(_dict_param), r"parameter d: unsupported type"),
        (lambda: tool(_varargs), r"parameter args: \*args"),
        (lambda: tool(_union), r"only X \| None unions"),
        (lambda: tool(_mixed_literal), r"Literal values must all be"),
    ],
)
def test_tools_refuse_what_a_schema_cannot_say(define: Callable[[], object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        define()


def _no_doc(x: str) -> str:
    return x


def _untyped(x):  # type: ignore[no-untyped-def]
    """Untyped."""


def _dict_param(d: dict[str, str]) -> None:
    """Takes a dict."""


def _varargs(*args: str) -> None:
    """Takes *args."""


def _union(x: int | str) -> None:
    """A union."""


def _mixed_literal(x: Literal["a", 1]) -> None:
    """Mixed literal."""


# ------------------------------------------------------------------ runner


@tool
def add(a: int, b: int = 2) -> dict[str, int]:
    """Add two numbers."""
    return {"sum": a + b, "thread": threading.get_ident()}


@tool
async def greet(name: str, formal: bool | None) -> str:
    """Greet someone."""
    return f"{'Good day' if formal else 'Hi'}, {name}"


@tool
async def sleepy() -> None:
    """Never answers."""
    await trio.sleep_forever()


@tool
def stuck() -> None:
    """A sync tool that blocks its thread."""
    threading.Event().wait(0.5)


@tool
def broken(x: str) -> None:
    """Always fails."""
    raise ValueError(f"cannot handle {x}")


@tool
async def refuses() -> None:
    """Refuses politely."""
    raise ToolError("the booking system is closed")


@tool
def not_json() -> object:
    """Returns something JSON cannot carry."""
    return {1, 2}


@tool
async def needs_call(call: CallContext) -> str:
    """Needs a live call."""
    return call.call_sid


@tool
def exits() -> None:
    """Calls sys.exit (in its worker thread)."""
    sys.exit(3)


@tool
async def exits_async() -> None:
    """Calls sys.exit in the server's own thread."""
    sys.exit(4)


@tool
def interrupts() -> None:
    """Raises KeyboardInterrupt itself (in its worker thread: not a signal)."""
    raise KeyboardInterrupt


@tool
def not_a_number() -> object:
    """Returns NaN, which JSON has no text for."""
    return {"x": float("nan")}


TOOLS = ToolSet([add, greet, sleepy, stuck, broken, refuses, not_json, needs_call, exits, exits_async, interrupts, not_a_number])


async def run(name: str, arguments: str, timeout_s: float = 5.0) -> tuple[Any, bool]:
    outcome = await TOOLS.run(name, arguments, timeout_s=timeout_s)
    assert outcome.respond
    return json.loads(outcome.output) if outcome.output.startswith(("{", "[")) else outcome.output, outcome.ok


async def test_tools_runner_runs_sync_tools_in_a_thread_and_async_ones_inline() -> None:
    result, ok = await run("add", '{"a": 40}')
    assert ok and result["sum"] == 42 and result["thread"] != threading.get_ident()
    again, ok = await run("add", '{"a": 1, "b": 2}')
    assert ok and again["sum"] == 3
    assert await run("greet", '{"name": "Ada"}') == ("Hi, Ada", True)  # Optional without default: None
    assert await run("greet", '{"name": "Ada", "formal": true}') == ("Good day, Ada", True)


async def test_tools_runner_null_means_the_default_unless_the_type_takes_none() -> None:
    """Models send null for an argument they mean to leave out."""
    result, ok = await run("add", '{"a": 40, "b": null}')  # b: int = 2
    assert ok and result["sum"] == 42
    assert await run("greet", '{"name": "Ada", "formal": null}') == ("Hi, Ada", True)  # bool | None: None itself
    assert await run("add", '{"a": null}') == ({"error": "bad arguments for add: a must be an integer, not null"}, False)


async def test_tools_runner_stuck_sync_tools_do_not_starve_other_threads() -> None:
    """Abandoned tool threads count against the tools' own limiter, not Trio's default one (DNS, records)."""
    release = threading.Event()

    @tool
    def hangs() -> None:
        """Blocks until released."""
        release.wait()

    tools = ToolSet([hangs])
    try:
        default = trio.to_thread.current_default_thread_limiter()
        for _ in range(int(default.total_tokens) + 5):
            outcome = await tools.run("hangs", "{}", timeout_s=0.001)
            assert not outcome.ok and "timed out" in outcome.output
        assert default.borrowed_tokens == 0
        with trio.fail_after(5):
            assert await trio.to_thread.run_sync(lambda: 42) == 42  # e.g. getaddrinfo for a new model session
    finally:
        release.set()


@pytest.mark.parametrize(
    ("name", "arguments", "error"),
    [
        ("add", "{not json", "bad arguments for add: not valid JSON (Expecting property name enclosed in double quotes)"),
        ("add", "[1, 2]", "bad arguments for add: expected a JSON object"),
        ("add", "{}", "bad arguments for add: missing required argument(s) a"),
        ("add", '{"a": 1, "c": 2}', "bad arguments for add: unknown argument(s) c"),
        ("add", '{"a": "1"}', 'bad arguments for add: a must be an integer, not "1"'),
        ("add", '{"a": true}', "bad arguments for add: a must be an integer, not true"),
        ("greet", '{"name": 5}', "bad arguments for greet: name must be a string, not 5"),
        (
            "nope",
            "{}",
            "unknown tool 'nope'; available: add, greet, sleepy, stuck, broken, refuses, not_json, needs_call, exits, "
            "exits_async, interrupts, not_a_number",
        ),
        ("broken", '{"x": "this"}', "broken failed: ValueError: cannot handle this"),
        ("refuses", "", "the booking system is closed"),
        ("not_json", "", "not_json returned a value that is not JSON: Object of type set is not JSON serializable"),
        ("needs_call", "{}", "needs_call needs a live call"),
        ("exits", "{}", "exits failed: SystemExit: 3"),  # (not the server's exit)
        ("exits_async", "{}", "exits_async failed: SystemExit: 4"),
        ("interrupts", "{}", "interrupts failed: KeyboardInterrupt: "),
        ("not_a_number", "{}", "not_a_number returned a value that is not JSON: Out of range float values are not JSON compliant"),
    ],
)
async def test_tools_runner_turns_every_failure_into_an_error_result(name: str, arguments: str, error: str) -> None:
    assert await run(name, arguments) == ({"error": error}, False)


async def test_tools_runner_the_models_error_text_quotes_no_credentials() -> None:
    """A library's exception may quote the request it made: the model gets the URL without key or password."""

    @tool
    def fetches() -> None:
        """Fails like an HTTP library."""
        raise RuntimeError("GET https://bob:pw1@api.example.com/v1/orders?api_key=SECRET failed: 500")

    outcome = await ToolSet([fetches]).run("fetches", "{}")
    assert json.loads(outcome.output) == {
        "error": "fetches failed: RuntimeError: GET https://api.example.com/v1/orders failed: 500"
    }


@fail_after(10)
async def test_tools_runner_a_long_error_is_cut_and_costs_the_event_loop_linear_time() -> None:
    """A library's message can quote a whole response: the model gets its first MAX_ERROR_CHARS, URLs still
    without credentials; finding them takes linear time (it runs in the event loop, with every call's audio)."""

    @tool
    async def long_error() -> None:
        """Fails with a huge message."""
        raise RuntimeError("bad payload " + "0123456789abcdef" * 20_000 + " https://u:pw@host/x?k=1")

    @tool
    async def long_refusal() -> None:
        """Refuses at length."""
        raise ToolError("e" * 100_000)

    tools = ToolSet([long_error, long_refusal])
    error = json.loads((await tools.run("long_error", "{}")).output)["error"]
    whole = "long_error failed: RuntimeError: bad payload " + "0123456789abcdef" * 20_000 + " https://host/x"
    assert error == whole[:MAX_ERROR_CHARS] + f"... (cut: {len(whole)} characters)"
    refusal = json.loads((await tools.run("long_refusal", "{}")).output)["error"]
    assert refusal == "e" * MAX_ERROR_CHARS + "... (cut: 100000 characters)"
    # (the URL at the end of a long message is still found: the linear pattern finds what the old one did)
    assert runner_module._without_secrets("x" * 50_000 + " https://u:pw@host/x?k=1") == "x" * 50_000 + " https://host/x"


async def test_tools_runner_numbers_are_taken_as_json_schema_takes_them() -> None:
    """1.0 is the integer 1 (JSON has one number type); NaN, Infinity and 1e400 (past a double) are refused."""

    @tool
    async def count(n: int, share: float = 1.0) -> dict[str, object]:
        """Counts."""
        return {"n": n, "type": type(n).__name__, "share": share}

    @tool
    async def weigh(w: Literal[0.5, 1.0]) -> str:
        """Weighs."""
        return repr(w)

    tools = ToolSet([count, weigh])
    assert json.loads((await tools.run("count", '{"n": 3.0}')).output) == {"n": 3, "type": "int", "share": 1.0}
    assert (await tools.run("weigh", '{"w": 1}')).output == "1.0"  # (a float parameter gets a float)
    assert json.loads((await tools.run("count", '{"n": 1, "share": 1%s}' % ("0" * 400))).output) == {
        "error": "bad arguments for count: share must be a number, not out of range"
    }
    for arguments, error in (
        ('{"n": 3.5}', "bad arguments for count: n must be an integer, not 3.5"),
        ('{"n": 1, "share": NaN}', "bad arguments for count: not valid JSON (NaN is not a JSON number)"),
        ('{"n": 1, "share": -Infinity}', "bad arguments for count: not valid JSON (-Infinity is not a JSON number)"),
        ('{"n": 1, "share": 1e400}', "bad arguments for count: share must be a number, not out of range"),
        ('{"n": 1e400}', "bad arguments for count: n must be an integer, not out of range"),
    ):
        assert json.loads((await tools.run("count", arguments)).output) == {"error": error}, arguments


async def test_tools_runner_sys_exit_from_a_tools_own_nursery_is_an_error_result() -> None:
    @tool
    async def spawns() -> None:
        """Exits from a task of its own."""

        async def leave() -> None:
            sys.exit(5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leave)

    outcome = await ToolSet([spawns]).run("spawns", "{}")
    assert not outcome.ok and json.loads(outcome.output)["error"].startswith("spawns failed: BaseExceptionGroup: ")


async def test_tools_runner_a_keyboard_interrupt_in_an_async_tool_goes_on() -> None:
    """In the server's own thread it may be a real Ctrl-C that Trio delivered into the tool: not swallowed."""

    @tool
    async def interrupted() -> None:
        """Raises KeyboardInterrupt."""
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await ToolSet([interrupted]).run("interrupted", "{}")


async def test_tools_runner_json_nested_too_deeply_is_an_error_result_not_a_failed_call() -> None:
    @tool
    def deep() -> list[object]:
        """Returns something absurdly nested."""
        value: list[object] = []
        for _ in range(100_000):
            value = [value]
        return value

    tools = ToolSet([add, deep])
    nested = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"  # a model's arguments: ~200 KB of brackets
    outcome = await tools.run("add", nested)
    assert (json.loads(outcome.output), outcome.ok) == ({"error": "bad arguments for add: nested too deeply"}, False)
    outcome = await tools.run("deep", "{}")
    assert (json.loads(outcome.output), outcome.ok) == ({"error": "deep returned a value nested too deeply for JSON"}, False)


async def test_tools_runner_times_out_async_tools(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    assert await run("sleepy", "{}", timeout_s=3) == ({"error": "sleepy timed out after 3 s"}, False)
    assert trio.current_time() - start == pytest.approx(3)


async def test_tools_runner_abandons_a_stuck_sync_tool() -> None:
    assert await run("stuck", "{}", timeout_s=0.05) == ({"error": "stuck timed out after 0.05 s"}, False)


def test_tools_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="two tools are named 'add'"):
        ToolSet([add, add])


# ------------------------------------------------------------------ loading

_counter = itertools.count()

LIVE_TOOLS = '''
import trio
from mediaserver.tools import CallContext, tool

reading = trio.Event()

@tool
def add(a: int, b: int) -> dict:
    """Add two numbers."""
    return {"sum": a + b}

@tool
async def slow() -> str:
    """Takes forever."""
    await trio.sleep_forever()

@tool
def broken(x: str) -> str:
    """Always fails."""
    raise RuntimeError("the database is down")

@tool
async def read_pin(call: CallContext) -> dict:
    """Read a four-digit PIN from the keypad."""
    reading.set()
    return {"pin": await call.next_digits(4, timeout_s=10), "call": call.call_sid}
'''


@pytest.fixture
def tools_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a module of tools to a fresh name on sys.path; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def write(source: str) -> str:
        name = f"mediaserver_test_tools_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_tools_load_module_and_builtins(tools_module: Callable[[str], str]) -> None:
    name = tools_module(LIVE_TOOLS)
    assert [t.name for t in load_module_tools(name)] == ["add", "slow", "broken", "read_pin"]
    # Without REST credentials transfer_call could not work, so only end_call is added.
    assert load_toolset(Settings(tools_module=name)).names == ("add", "slow", "broken", "read_pin", "end_call")
    with_rest = Settings(tools_module=name, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN)
    # ... and without MEDIASERVER_TRANSFER_NUMBERS it would dial anything a caller talks the model into: not offered
    assert load_toolset(with_rest).names[-1] == "end_call"
    allowed = with_rest.with_(transfer_numbers="+15557654321, +44*")
    toolset = load_toolset(allowed)
    assert toolset.names[-2:] == ("end_call", "transfer_call")
    [transfer] = [spec for spec in toolset.specs() if spec.name == "transfer_call"]
    assert "+15557654321, +44*" in transfer.description  # the model is told where it may transfer
    assert load_toolset(Settings()).names == ("end_call",)
    chosen = tools_module(LIVE_TOOLS + '\nBUILTIN_TOOLS = ["send_digits"]\n')
    assert load_toolset(Settings(tools_module=chosen)).names[-1] == "send_digits"
    none = tools_module(LIVE_TOOLS + "\nBUILTIN_TOOLS = ()\n")
    assert load_toolset(Settings(tools_module=none)).names == ("add", "slow", "broken", "read_pin")


def test_tools_end_call_tells_the_model_to_say_goodbye_first() -> None:
    # The model reads only the description: a docstring's later paragraphs never reach it.
    [end] = load_toolset(Settings()).specs()
    assert end.name == "end_call"
    assert "Say goodbye first, in the same turn" in end.description
    assert "If the caller speaks over the goodbye, the call goes on; call this again" in end.description
    assert end.parameters["properties"]["reason"]["description"] == "Why the call is ending, for the call log."


def test_tools_transfer_numbers_without_rest_credentials_say_why_transfer_call_is_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mediaserver.tools as tools_package

    monkeypatch.setattr(tools_package, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="mediaserver")
    assert load_toolset(Settings(transfer_numbers="+15557654321")).names == ("end_call",)
    assert [r.getMessage() for r in caplog.records] == [
        "transfer_call is not offered: MEDIASERVER_TRANSFER_NUMBERS is set, but transfers need Twilio REST credentials "
        "(TWILIO_ACCOUNT_SID with TWILIO_AUTH_TOKEN or an API key)"
    ]
    caplog.clear()
    assert load_toolset(Settings()).names == ("end_call",)  # (neither set: nothing to say)
    assert caplog.records == []


def test_tools_module_in_the_working_directory_is_found_without_pythonpath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MEDIASERVER_TOOLS=my_tools mediaserver serve`` beside my_tools.py: the console script's path lacks the cwd."""
    name = f"mediaserver_test_cwd_tools_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(LIVE_TOOLS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), ".")])
    try:
        assert [t.name for t in load_module_tools(name)] == ["add", "slow", "broken", "read_pin"]
        # searched last (it shadows nothing installed), and kept: a tool may import a module beside it as it runs
        assert sys.path[-1] == str(tmp_path)
    finally:
        sys.modules.pop(name, None)


def test_tools_loading_errors_are_config_errors(tools_module: Callable[[str], str]) -> None:
    with pytest.raises(ConfigError, match=r"^MEDIASERVER_TOOLS=no_such_module_xyz: cannot import it: ModuleNotFoundError") as e:
        load_module_tools("no_such_module_xyz")
    assert str(e.value).endswith("(the module must be importable: in the working directory, installed, or on PYTHONPATH)")
    broken = tools_module("import definitely_missing_dependency\n")
    with pytest.raises(ConfigError, match=rf"^MEDIASERVER_TOOLS={broken}: cannot import it: .*definitely_missing") as e:
        load_toolset(Settings(tools_module=broken))
    assert "PYTHONPATH" not in str(e.value)  # found; what it imports is missing
    empty = tools_module("X = 1\n")
    with pytest.raises(ConfigError, match="defines no @tool functions"):
        load_module_tools(empty)
    bad_schema = tools_module("from mediaserver.tools import tool\n@tool\ndef f(x: dict) -> None:\n    '''F.'''\n")
    with pytest.raises(ConfigError, match=r"cannot import it: TypeError: tool f, parameter x: unsupported type"):
        load_module_tools(bad_schema)
    for bad in ("['hang_up']", "5", "None.__class__", "b'end_call'"):
        bad_builtins = tools_module(LIVE_TOOLS + f"\nBUILTIN_TOOLS = {bad}\n")
        with pytest.raises(ConfigError, match="BUILTIN_TOOLS must be a list of end_call, transfer_call, send_digits"):
            load_toolset(Settings(tools_module=bad_builtins))
    asks_transfer = tools_module(LIVE_TOOLS + "\nBUILTIN_TOOLS = ['transfer_call']\n")
    with pytest.raises(ConfigError, match="asks for transfer_call, which needs Twilio REST credentials .* and MEDIASERVER_TRANSFER_NUMBERS$"):
        load_toolset(Settings(tools_module=asks_transfer))
    rest_only = Settings(tools_module=asks_transfer, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN)
    with pytest.raises(ConfigError, match="which needs MEDIASERVER_TRANSFER_NUMBERS$"):
        load_toolset(rest_only)
    assert load_toolset(rest_only.with_(transfer_numbers="+15557654321")).names[-1] == "transfer_call"


def test_tools_module_mistakes_get_clear_errors(tools_module: Callable[[str], str]) -> None:
    with pytest.raises(TypeError, match=r"^@tool takes a function, not 'lookup'; to name the tool: @tool\(name=...\)$"):
        tool("lookup")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"^tool add: @tool is applied twice$"):
        tool(add)  # type: ignore[call-overload]
    exits = tools_module("import sys\nsys.exit(3)\n")
    with pytest.raises(ConfigError, match=rf"^MEDIASERVER_TOOLS={exits}: cannot import it: SystemExit: 3"):
        load_module_tools(exits)
    for path in ("my_tools.py", "./my_tools", "tools/my_tools"):
        with pytest.raises(ConfigError, match=rf"^MEDIASERVER_TOOLS={re.escape(path)}: give the module's name, not a file's"):
            load_module_tools(path)
    aliased = tools_module(LIVE_TOOLS + "\nplus = add\n")  # (a second name for a tool is not a second tool)
    assert [t.name for t in load_module_tools(aliased)] == ["add", "slow", "broken", "read_pin"]
    generated = tools_module(LIVE_TOOLS + '\nBUILTIN_TOOLS = (n for n in ["send_digits"])\n')
    assert load_toolset(Settings(tools_module=generated)).names[-1] == "send_digits"


def test_tools_a_modules_own_tool_with_a_builtins_name_replaces_it_and_says_so(
    tools_module: Callable[[str], str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mediaserver.tools as tools_package

    monkeypatch.setattr(tools_package, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="mediaserver")
    own = tools_module(LIVE_TOOLS + '''
@tool
async def transfer_call(to: str, call: CallContext) -> str:
    """Transfers anywhere."""
    await call.transfer(to)
    return "ok"
''')
    settings = Settings(
        tools_module=own, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN, transfer_numbers="+15557654321"
    )
    toolset = load_toolset(settings)
    assert toolset.names.count("transfer_call") == 1
    [spec] = [spec for spec in toolset.specs() if spec.name == "transfer_call"]
    assert spec.description == "Transfers anywhere."  # the module's, not the built-in's
    assert [r.getMessage() for r in caplog.records] == [
        f"MEDIASERVER_TOOLS={own}: its own transfer_call replaces the built-in one "
        "(MEDIASERVER_TRANSFER_NUMBERS does not limit it)"
    ]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "no numbers given"),
        (" , ", "no numbers given"),
        ("15557654321", "'15557654321' is neither an E.164 number"),
        ("+15557654321,+1 555 765", "'+1 555 765' is neither"),
        ("+0123456789", "'+0123456789' is neither"),
        ("*", "'*' is neither"),
        ("+1555*9", "'+1555*9' is neither"),
    ],
)
def test_transfer_numbers_setting_is_checked_at_start(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(f"MEDIASERVER_TRANSFER_NUMBERS: {problem}")):
        Settings(transfer_numbers=spec).validated()


@pytest.mark.parametrize(
    ("number", "allowed"),
    [
        ("+15557654321", True),
        ("+15557654322", False),
        ("+442071234567", True),  # +44*
        ("+4420712345", True),
        ("+14420712345", False),  # contains 44, does not start with it
        ("+33123456789", False),
        ("+15557654321\n", False),  # a listed number and a newline is not E.164
    ],
)
async def test_transfer_call_dials_only_listed_numbers(number: str, allowed: bool) -> None:
    transfer = transfer_tool(parse_transfer_numbers("+15557654321,+44*"))
    dialled: list[str] = []

    class Control:
        call_sid = CALL_A

        async def transfer(self, to: str) -> None:
            dialled.append(to)

    context = CallContext(Control())  # type: ignore[arg-type]
    if allowed:
        assert await transfer.fn(context, number) == {"status": f"transferring the caller to {number}"}
        assert dialled == [number]
    elif not number.isprintable():
        with pytest.raises(ToolError, match="give an E.164 number such as"):
            await transfer.fn(context, number)
        assert dialled == []
    else:
        with pytest.raises(ToolError, match=f"^cannot transfer to \\{number}: transfers may only go to \\+15557654321, \\+44\\*$"):
            await transfer.fn(context, number)
        assert dialled == []


async def test_tools_send_digits_explains_twilios_limit() -> None:
    tools = ToolSet([BUILTINS["send_digits"]])
    outcome = await tools.run("send_digits", '{"digits": "1234#"}')
    assert not outcome.ok
    assert "Twilio Media Streams carry no outbound DTMF" in json.loads(outcome.output)["error"]
    bad = await tools.run("send_digits", '{"digits": "12x"}')
    assert json.loads(bad.output) == {"error": "cannot send '12x': use up to 32 of 0-9, *, #, w and W"}


def test_tools_send_text_is_an_openai_user_message() -> None:
    session = OpenAIRealtimeSession(OpenAIRealtimeConfig(model="gpt-realtime"))
    session.initial_messages()
    create, respond = session.send(SendText("The caller pressed 1 on the phone keypad."))
    item = validate_client_event(create)
    assert isinstance(item, ConversationItemCreateEvent)
    assert isinstance(item.item, RealtimeConversationItemUserMessage)
    assert [(c.type, c.text) for c in item.item.content] == [("input_text", "The caller pressed 1 on the phone keypad.")]
    assert isinstance(validate_client_event(respond), ResponseCreateEvent)
    (only,) = session.send(SendText("quiet", respond=False))
    assert isinstance(validate_client_event(only), ConversationItemCreateEvent)


# ------------------------------------------------------------- on live calls


@pytest.fixture(autouse=True)
def _quiet_records(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")
    monkeypatch.chdir(tmp_path)  # anything the server writes (call records in ./data) stays in tmp_path

CALL_A = "CA" + "a" * 32
TRANSFER_TO = "+15557654321"


async def model_calls(
    session: FakeRealtimeSession, name: str, arguments: str, call_id: str, *, response_id: str | None = None
) -> None:
    """The model calls a function: function_call_arguments.done then its item done (completed), inside its own
    response unless ``response_id`` names one already open (SDK models, as the GA server sends them)."""
    own = response_id is None
    rid = response_id or f"resp_{call_id}"
    item_id = f"item_{call_id}"
    if own:
        await session.send(
            ResponseCreatedEvent(
                type="response.created",
                event_id=session._event_id(),
                response=RealtimeResponse(id=rid, object="realtime.response", status="in_progress"),
            )
        )
    await session.send(
        ResponseFunctionCallArgumentsDoneEvent(
            type="response.function_call_arguments.done",
            event_id=session._event_id(),
            response_id=rid,
            item_id=item_id,
            output_index=0,
            call_id=call_id,
            name=name,
            arguments=arguments,
        )
    )
    item = RealtimeConversationItemFunctionCall(
        type="function_call", id=item_id, call_id=call_id, name=name, arguments=arguments, status="completed"
    )
    await session.send(
        ResponseOutputItemDoneEvent(
            type="response.output_item.done", event_id=session._event_id(), response_id=rid, output_index=0, item=item
        )
    )
    if own:
        await session.send(
            ResponseDoneEvent(
                type="response.done",
                event_id=session._event_id(),
                response=RealtimeResponse(id=rid, object="realtime.response", status="completed", output=[item]),
            )
        )


def outputs(session: FakeRealtimeSession) -> dict[str, tuple[str, bool]]:
    """call_id -> (output, followed by response.create) for every function_call_output we sent."""
    received = [model for _, model in session.received]
    found: dict[str, tuple[str, bool]] = {}
    for index, model in enumerate(received):
        if isinstance(model, ConversationItemCreateEvent) and isinstance(
            model.item, RealtimeConversationItemFunctionCallOutput
        ):
            after = received[index + 1] if index + 1 < len(received) else None
            found[model.item.call_id] = (model.item.output, isinstance(after, ResponseCreateEvent))
    return found


def user_texts(session: FakeRealtimeSession) -> list[tuple[str, bool]]:
    """(text, followed by response.create) for every user text message we sent."""
    received = [model for _, model in session.received]
    texts = []
    for index, model in enumerate(received):
        if isinstance(model, ConversationItemCreateEvent) and isinstance(
            model.item, RealtimeConversationItemUserMessage
        ):
            after = received[index + 1] if index + 1 < len(received) else None
            for part in model.item.content:
                texts.append((part.text or "", isinstance(after, ResponseCreateEvent)))
    return texts


async def wait_output(session: FakeRealtimeSession, call_id: str) -> tuple[str, bool]:
    await session.wait_for(lambda: call_id in outputs(session))
    return outputs(session)[call_id]


@fail_after(15)
async def test_tools_round_trip_timeout_and_exception_on_a_call(
    tools_module: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    done = trio.Event()

    async def script(session: FakeRealtimeSession) -> None:
        await session.ready.wait()
        for call_id, name, arguments in (
            ("call_add", "add", '{"a": 2, "b": 3}'),
            ("call_slow", "slow", "{}"),
            ("call_broken", "broken", '{"x": "y"}'),
            ("call_add_again", "add", '{"a": "two", "b": 1}'),
        ):
            await model_calls(session, name, arguments, call_id)
            await wait_output(session, call_id)
        done.set()

    name = tools_module(LIVE_TOOLS)
    async with fake_openai(script) as model:
        settings = openai_settings(model, tools_module=name, tool_timeout_s=0.5)
        async with running(settings) as url, phone_call(url, CALL_A) as caller:
            session = await model.session(0)
            await done.wait()
            appends = len(session.appends)
            await caller.send_silence(200)  # the call is still up and carrying audio
            await session.wait_appends(appends + 1)
            assert not caller.closed.is_set()
            await caller.stop()
    assert outputs(session) == {
        "call_add": ('{"sum": 5}', True),
        "call_slow": ('{"error": "slow timed out after 0.5 s"}', True),
        "call_broken": ('{"error": "broken failed: RuntimeError: the database is down"}', True),
        "call_add_again": ('{"error": "bad arguments for add: a must be an integer, not \\"two\\""}', True),
    }
    assert session.session_update is not None
    tools = session.session_update.session.tools  # type: ignore[union-attr]
    assert [t.name for t in tools] == ["add", "slow", "broken", "read_pin", "end_call"]  # type: ignore[union-attr]
    assert tools[0].parameters == {  # type: ignore[index,union-attr]
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    assert "read_pin" not in json.dumps(tools[3].parameters)  # type: ignore[index,union-attr]


@fail_after(15)
async def test_tools_end_call_hangs_up_after_the_goodbye_has_played(caplog: pytest.LogCaptureFixture) -> None:
    goodbye = to_ulaw(tone(440, 1000))  # 1 s of µ-law at 8 kHz: the session format is pcmu
    finished_at: list[float] = []

    async def script(session: FakeRealtimeSession) -> None:
        await session.ready.wait()
        record = await session.respond(goodbye, done=False)
        # The model calls end_call while its goodbye is still being generated and played.
        await model_calls(session, "end_call", '{"reason": "caller said bye"}', "call_end", response_id=record.response_id)
        await trio.sleep(0.2)
        await session.finish(record)
        finished_at.append(trio.current_time())

    async with fake_openai(script) as model, running(openai_settings(model)) as url:
        async with phone_call(url, CALL_A) as caller:
            await caller.closed.wait()
        session = await model.session(0)
    assert len(caller.received_audio) == len(goodbye)
    assert caller.clears == [] and all(not echo.cleared for echo in caller.echoes)
    assert caller.played_marked_bytes == len(goodbye)  # every chunk was confirmed played...
    assert caller.echoes[-1].at_s <= caller.closed_at_s  # ...before the stream was closed
    assert caller.closed_at_s is not None and caller.closed_at_s >= caller.playback.buffer_end_s
    assert caller.closed_at_s >= finished_at[0]
    assert outputs(session)["call_end"] == (json.dumps({"status": END_CALL_STATUS}), False)
    assert "speaks over it, the call goes on" in END_CALL_STATUS
    ended = [r.getMessage() for r in caplog.records if "ended (" in r.getMessage()]
    assert any("agent hung up: caller said bye" in m for m in ended), ended


@fail_after(15)
async def test_tools_a_modules_own_tool_that_ends_the_call_asks_the_model_for_nothing_more(
    tools_module: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """As the built-in end_call: the goodbye was said before the tool was called; another reply would follow it."""

    async def script(session: FakeRealtimeSession) -> None:
        await session.ready.wait()
        await model_calls(session, "wrap_up", "{}", "call_wrap")

    name = tools_module(LIVE_TOOLS + '''
@tool
async def wrap_up(call: CallContext) -> str:
    """Ends the call."""
    await call.end_call("wrapped up")
    return "done"
''')
    async with fake_openai(script) as model, running(openai_settings(model, tools_module=name)) as url:
        async with phone_call(url, CALL_A) as caller:
            await caller.closed.wait()
        session = await model.session(0)
    assert outputs(session)["call_wrap"] == ("done", False)
    assert any("agent hung up: wrapped up" in r.getMessage() for r in caplog.records)


@fail_after(15)
async def test_tools_transfer_call_redirects_with_dial_twiml(caplog: pytest.LogCaptureFixture) -> None:
    async def script(session: FakeRealtimeSession) -> None:
        await session.ready.wait()
        await model_calls(session, "transfer_call", '{"to": "+1555"}', "call_bad_number")
        await wait_output(session, "call_bad_number")
        await model_calls(session, "transfer_call", '{"to": "+19005550100"}', "call_not_listed")
        await wait_output(session, "call_not_listed")
        await model_calls(session, "transfer_call", json.dumps({"to": TRANSFER_TO}), "call_refused")
        await wait_output(session, "call_refused")
        await model_calls(session, "transfer_call", json.dumps({"to": TRANSFER_TO}), "call_transfer")

    async with fake_rest() as rest, fake_openai(script) as model:
        settings = openai_settings(
            model,
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=AUTH_TOKEN,
            twilio_api_base=rest.base_url,
            transfer_numbers=TRANSFER_TO,
        )
        rest.fail_next = TwilioError(400, 21220, "Call is not in-progress. Cannot redirect.")
        async with running(settings) as url, phone_call(url, CALL_A, auth_token=AUTH_TOKEN) as caller:
            await caller.closed.wait()
        session = await model.session(0)
    found = outputs(session)
    assert found["call_bad_number"] == (
        json.dumps({"error": "cannot transfer to '+1555': give an E.164 number such as +15551234567"}),
        True,
    )
    assert found["call_not_listed"] == (
        json.dumps({"error": f"cannot transfer to +19005550100: transfers may only go to {TRANSFER_TO}"}),
        True,
    )  # and no REST request was made for it (checked below: only the two allowed attempts)
    refused, respond = found["call_refused"]
    assert respond and json.loads(refused) == {
        "error": "the transfer failed: Twilio error 21220 (HTTP 400): Call is not in-progress. Cannot redirect."
        " (see https://www.twilio.com/docs/errors/21220)"
    }
    assert [(r.method, r.path, r.username) for r in rest.requests] == [
        ("POST", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_A}.json", ACCOUNT_SID)
    ] * 2
    expected = f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial>{TRANSFER_TO}</Dial></Response>'
    assert [r.form for r in rest.requests] == [[("Twiml", expected)]] * 2
    ended = [r.getMessage() for r in caplog.records if "ended (" in r.getMessage()]
    assert any(f"transferred to {TRANSFER_TO}" in m for m in ended), ended


@fail_after(20)
async def test_tools_transfer_twilio_does_not_answer_in_time_may_be_under_way() -> None:
    # Twilio got the redirect and its answer does not come: within the tool's time limit (not the REST client's
    # own 15 s) the model hears the transfer may be under way, not that it failed.
    asked: list[float] = []

    async def script(session: FakeRealtimeSession) -> None:
        await session.ready.wait()
        asked.append(trio.current_time())
        await model_calls(session, "transfer_call", json.dumps({"to": TRANSFER_TO}), "call_transfer")

    async with fake_rest() as rest, fake_openai(script) as model:
        rest.answer_delay_s = 60.0
        settings = openai_settings(
            model, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN, twilio_api_base=rest.base_url,
            transfer_numbers=TRANSFER_TO, tool_timeout_s=6.0,
        )  # fmt: skip
        async with running(settings) as url, phone_call(url, CALL_A, auth_token=AUTH_TOKEN) as caller:
            session = await model.session(0)
            await wait_output(session, "call_transfer")
            waited_s = trio.current_time() - asked[0]
            assert not caller.closed.is_set()  # no answer: the call is not ended here
            await caller.stop()
    output, respond = outputs(session)["call_transfer"]
    assert json.loads(output) == {
        "error": f"no answer from Twilio in time: the transfer to {TRANSFER_TO} may be under way"
    }
    assert respond and len(rest.requests) == 1
    assert 5.0 <= waited_s < 7.5  # the tool's 6 s, not 15 s


@fail_after(15)
async def test_tools_dtmf_reaches_the_model_as_text() -> None:
    async with fake_openai() as model, running(openai_settings(model)) as url:
        async with phone_call(url, CALL_A) as caller:
            session = await model.session(0)
            await session.ready.wait()
            for digit in "42#":
                await caller.dtmf(digit)
            await session.wait_for(lambda: bool(user_texts(session)))
            await caller.dtmf("9")
            await session.wait_for(lambda: len(user_texts(session)) == 2)
            await caller.stop()
    assert user_texts(session) == [
        ("The caller pressed 4, 2, # on the phone keypad.", True),
        ("The caller pressed 9 on the phone keypad.", True),
    ]


@fail_after(15)
async def test_tools_a_flood_of_dtmf_reaches_the_model_in_bounded_batches(caplog: pytest.LogCaptureFixture) -> None:
    """A caller (or a forged stream) that never pauses: the model is told MAX_DTMF_BATCH keys at a time, and the
    log has a line per batch, not per key."""
    from mediaserver.bridge.call import MAX_DTMF_BATCH

    caplog.set_level(logging.INFO, logger="mediaserver")
    keys = "0123456789*#" * 11  # 132 keys, no pause
    async with fake_openai() as model, running(openai_settings(model)) as url:
        async with phone_call(url, CALL_A) as caller:
            session = await model.session(0)
            await session.ready.wait()
            for digit in keys:
                await caller.dtmf(digit)
            await session.wait_for(lambda: len(user_texts(session)) == 3)
            await caller.stop()
    batches = [keys[:MAX_DTMF_BATCH], keys[MAX_DTMF_BATCH : 2 * MAX_DTMF_BATCH], keys[2 * MAX_DTMF_BATCH :]]
    assert [text for text, _ in user_texts(session)] == [
        f"The caller pressed {', '.join(batch)} on the phone keypad." for batch in batches
    ]
    logged = [r.getMessage().split(": ", 1)[1] for r in caplog.records if "keypad" in r.getMessage() and CALL_A in r.getMessage()]
    assert logged == [f"keypad {batch}" for batch in batches]


@fail_after(15)
async def test_tools_dtmf_goes_to_a_tool_reading_the_keypad(tools_module: Callable[[str], str]) -> None:
    name = tools_module(LIVE_TOOLS)

    async def script(session: FakeRealtimeSession) -> None:
        await session.ready.wait()
        await model_calls(session, "read_pin", "{}", "call_pin")

    async with fake_openai(script) as model, running(openai_settings(model, tools_module=name)) as url:
        async with phone_call(url, CALL_A) as caller:
            module: ModuleType = sys.modules[name]
            await module.reading.wait()
            for digit in "1234":
                await caller.dtmf(digit)
            session = await model.session(0)
            await wait_output(session, "call_pin")
            await trio.sleep(1.2)  # longer than the gap after which digits would go to the model
            await caller.stop()
    output, respond = outputs(session)["call_pin"]
    assert json.loads(output) == {"pin": "1234", "call": CALL_A} and respond
    assert user_texts(session) == []  # the digits were the tool's, not the model's
