"""Per-frame cost of each bridge stage, in process, for every audio path.

Run ``.venv/bin/python bench/frame_path.py`` (``make bench`` does).  For each
path it feeds pre-built wire messages through the same objects, in the same
order, as :class:`mediaserver.bridge.call.CallBridge` does, and times every
stage of every frame with ``time.perf_counter_ns``:

* uplink (one Twilio ``media`` message, 20 ms of µ-law): Twilio core parse
  (``TwilioStream.take_media``: the native media scanner, checks, base64),
  jitter buffer push + pop, µ-law decode, resample, VAD, provider message
  serialisation and WebSocket framing in one native step (the core's
  ``audio_envelope()`` and ``_wsframe.encode_b64_frame``, as
  ``WebSocketLink.send_audio_nowait`` does);
* downlink (one provider delta of ``CHUNK_MS`` = the bridge's chunk, 40 ms):
  provider core parse (``receive_message`` + ``events()``: JSON, base64),
  resample, µ-law encode, Twilio ``media`` + ``mark`` serialisation and
  framing (``TwilioStream.send_chunk`` and the native framer, as
  ``ServerStream.send_media_nowait`` does), and parsing Twilio's echo of that mark
  (``receive_event``).

Downlink figures are divided by ``CHUNK_MS / 20`` so both directions are
per 20 ms of audio.  Each stage's time has the cost of an identity stage
(clock reads and the call through the stage list) subtracted.  Per repeat
the median and p99 over all frames are taken; the table shows the median of
those over the repeats (the first repeat is a warm-up and is dropped).  The
"total" rows are per-frame sums (so their p99 is the p99 of the sum, not a
sum of p99s).

Not in the totals: the VAD row (``EnergyVAD`` on the 8 kHz PCM;
``CallBridge`` has no local VAD yet); the "ordinary parser" row (the same
messages through ``receive_message``: ``json.loads`` and the field checks,
what the native scanner replaced) and its "of which" rows, ``json.loads``
and base64 standalone; and the WebSocket rows, the framing of one uplink
message in and out (parse a masked client frame; frame and mask the
provider message), natively as the server does it and with wsproto for
comparison, which belong to the I/O layer.  Socket I/O and Trio scheduling are not measured
here (``bench/load.py`` measures the whole server).  The 16 kHz and 8 kHz PCM
paths use the OpenAI core as a stand-in serialiser (same base64-in-JSON
shape; Gemini and the generic PCM provider wrap audio the same way).

Options: ``--quick`` (few frames and repeats, for smoke tests), ``--frames``,
``--repeats``, ``--json PATH``.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, when imported from elsewhere
# This checkout's mediaserver, not whichever one is installed (the venv's may be another checkout's, editable)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from _measure import (  # noqa: E402
    Column,
    check_output_path,
    cpu_model,
    interrupt_on_sigterm,
    print_header,
    render_table,
    utc_now,
    write_json,
)
from wsproto.connection import Connection, ConnectionType  # noqa: E402
from wsproto.events import TextMessage  # noqa: E402

from mediaserver._native._wsframe import scan  # noqa: E402
from mediaserver.codec import EnergyVAD, JitterBuffer, Resampler, ulaw_decode, ulaw_encode  # noqa: E402
from mediaserver.protocol.providers import base as pv  # noqa: E402
from mediaserver.protocol.providers.openai import OpenAIRealtimeConfig, OpenAIRealtimeSession  # noqa: E402
from mediaserver.protocol.twilio import TwilioStream  # noqa: E402
from mediaserver._native._wsframe import encode_b64_frame  # noqa: E402
from mediaserver.transport.ws_client import data_frame  # noqa: E402
from mediaserver.transport.ws_server import server_frame  # noqa: E402

FRAME_MS = 20  # a Twilio media frame
CHUNK_MS = 40  # the bridge's downlink chunk (CallBridge chunk_ms default)
STREAM_SID = "MZ" + "0" * 32
CALL_SID = "CA" + "0" * 32
ACCOUNT_SID = "AC" + "0" * 32

Stage = Callable[[object], object]


@dataclasses.dataclass(frozen=True)
class Path_:
    """One audio path: the provider's input and output rate; 0 means µ-law passthrough."""

    name: str
    example: str
    rate_hz: int  # 0: pcmu passthrough, else PCM16 at this rate both ways


PATHS = (
    Path_("pcmu passthrough", "OpenAI pcmu", 0),
    Path_("pcm16 8k", "generic PCM provider", 8000),
    Path_("pcm16 16k", "Gemini input, echo", 16000),
    Path_("pcm16 24k", "OpenAI pcm24k, Gemini output", 24000),
)


# --- wire messages ---------------------------------------------------------------


def caller_audio(n_frames: int, seed: int = 1) -> list[bytes]:
    """Speech-like µ-law frames: a 220 Hz tone with noise, amplitude varying per frame."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * 160) / 8000
    envelope = 0.2 + 0.8 * np.abs(np.sin(2 * np.pi * 0.7 * t))
    # peak 8000 plus noise with sigma 300: far inside int16, no clipping needed
    x = 8000 * envelope * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 300, t.size)
    pcm = np.rint(x).astype("<i2").tobytes()
    ulaw = ulaw_encode(pcm)
    return [ulaw[i * 160 : (i + 1) * 160] for i in range(n_frames)]


def twilio_preamble() -> list[str]:
    connected = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    start = json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": STREAM_SID,
            "start": {
                "streamSid": STREAM_SID,
                "accountSid": ACCOUNT_SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "customParameters": {},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )
    return [connected, start]


def twilio_media(frames: Sequence[bytes], first_seq: int = 2) -> list[str]:
    """Twilio ``media`` messages as Twilio writes them (numeric fields are strings)."""
    return [
        json.dumps(
            {
                "event": "media",
                "sequenceNumber": str(first_seq + i),
                "streamSid": STREAM_SID,
                "media": {
                    "track": "inbound",
                    "chunk": str(i + 1),
                    "timestamp": str(i * FRAME_MS),
                    "payload": base64.b64encode(frame).decode("ascii"),
                },
            }
        )
        for i, frame in enumerate(frames)
    ]


def twilio_mark_echoes(n: int, first_seq: int = 2) -> list[str]:
    """Twilio's echoes of our marks "1".."n", in order."""
    return [
        json.dumps({"event": "mark", "sequenceNumber": str(first_seq + i), "streamSid": STREAM_SID, "mark": {"name": str(i + 1)}})
        for i in range(n)
    ]


def openai_deltas(chunks: Sequence[bytes]) -> list[str]:
    """GA ``response.output_audio.delta`` messages, one per chunk, as the server sends them."""
    return [
        json.dumps(
            {
                "type": "response.output_audio.delta",
                "event_id": f"event_{i}",
                "response_id": "resp_1",
                "item_id": "item_1",
                "output_index": 0,
                "content_index": 0,
                "delta": base64.b64encode(chunk).decode("ascii"),
            }
        )
        for i, chunk in enumerate(chunks)
    ]


def ready_session(audio_format: str) -> OpenAIRealtimeSession:
    """An OpenAI core past its handshake (session.created, session.updated)."""
    session = OpenAIRealtimeSession(OpenAIRealtimeConfig(model="gpt-realtime", audio_format=audio_format))  # type: ignore[arg-type]
    session.initial_messages()
    fmt = {"type": "audio/pcmu"} if audio_format == "pcmu" else {"type": "audio/pcm", "rate": 24000}
    session.receive_message(json.dumps({"type": "session.created", "event_id": "e0", "session": {"type": "realtime", "id": "sess_1"}}))
    session.receive_message(
        json.dumps(
            {
                "type": "session.updated",
                "event_id": "e1",
                "session": {"type": "realtime", "audio": {"input": {"format": fmt}, "output": {"format": fmt}}},
            }
        )
    )
    list(session.events())
    return session


# --- stages --------------------------------------------------------------------------


@dataclasses.dataclass
class Pipeline:
    """Stages of one direction of one path; ``info`` stages are timed but not summed."""

    stages: list[tuple[str, Stage]]
    info: list[tuple[str, Stage, list[object]]] = dataclasses.field(default_factory=list)


def uplink(path: Path_, frames: Sequence[bytes]) -> tuple[Pipeline, list[object]]:
    """Fresh uplink state, its stages in CallBridge order, and the inputs (Twilio messages)."""
    twilio = TwilioStream()
    for message in twilio_preamble():
        twilio.receive_message(message)
    list(twilio.events())
    jitter = JitterBuffer(depth=2, frame_bytes=160, codec="ulaw", fill="fade")
    session = ready_session("pcmu" if path.rate_hz == 0 else "pcm24k")
    vad = EnergyVAD(8000, FRAME_MS)
    messages: list[object] = list(twilio_media(frames))

    def parse(message: object) -> object:
        taken = twilio.take_media(message)  # type: ignore[arg-type]
        assert taken is not None  # every generated frame takes the native path, as in the bridge
        return taken

    ordinary = TwilioStream()  # the same messages through json.loads and the field checks
    for message in twilio_preamble():
        ordinary.receive_message(message)
    list(ordinary.events())

    def parse_ordinary(message: object) -> object:
        ordinary.receive_message(message)  # type: ignore[arg-type]
        for event in ordinary.events():
            return event
        return None

    def jitter_stage(taken: object) -> object:
        jitter.push(*taken)  # type: ignore[misc]
        out = b""
        for frame in iter(jitter.pop, None):
            out += frame
        return out

    def serialize(frame: object) -> object:
        # WebSocketLink.send_audio_nowait: the core's envelope, framed and masked natively
        envelope = session.audio_envelope()
        assert envelope is not None
        return encode_b64_frame(envelope[0], frame, envelope[1], True)  # type: ignore[arg-type]

    stages: list[tuple[str, Stage]] = [("Twilio parse (take_media: native scan, checks, base64)", parse), ("jitter push+pop", jitter_stage)]
    if path.rate_hz:
        stages.append(("µ-law decode", lambda frame: ulaw_decode(frame)))  # type: ignore[arg-type]
        if path.rate_hz != 8000:
            up = Resampler(8000, path.rate_hz)
            stages.append((f"resample 8k->{path.rate_hz // 1000}k", lambda pcm: up.process(pcm)))  # type: ignore[arg-type]
    stages.append(("provider serialize + frame (native envelope)", serialize))

    pcm_frames: list[object] = [ulaw_decode(f) for f in frames]
    media_bodies: list[object] = [json.loads(m)["media"]["payload"] for m in messages]  # type: ignore[arg-type]
    appends = [session.send(pv.SendAudio(ulaw_decode(f) if path.rate_hz else f))[0] for f in frames]
    info: list[tuple[str, Stage, list[object]]] = [
        ("  ordinary parser (json.loads, checks), not used", parse_ordinary, messages),
        ("  of which json.loads", lambda m: json.loads(m), messages),  # type: ignore[arg-type]
        ("  of which base64 decode", lambda p: binascii.a2b_base64(p, strict_mode=True), media_bodies),  # type: ignore[arg-type]
        ("VAD (EnergyVAD, not in bridge)", lambda pcm: vad.process(pcm), pcm_frames),  # type: ignore[arg-type]
        *websocket_stages(list(messages), appends),  # type: ignore[arg-type]
    ]
    return Pipeline(stages, info), messages


def websocket_stages(inbound: list[str], outbound: list[str]) -> list[tuple[str, Stage, list[object]]]:
    """WebSocket framing of one message each way (not summed: it is I/O), the server's way and wsproto's.

    Inbound: a masked client frame (Twilio -> us) parsed into a message;
    outbound: one message framed and masked (we are the provider's client).
    The server uses the native frame path (``_wsframe.scan``,
    ``ws_client.data_frame``); wsproto, which it keeps for every unusual
    frame, is shown for comparison.
    """
    sender = Connection(ConnectionType.CLIENT)
    frames: list[object] = [sender.send(TextMessage(data=m)) for m in inbound]
    receiver = Connection(ConnectionType.SERVER)
    client = Connection(ConnectionType.CLIENT)

    def receive(frame: object) -> object:
        receiver.receive_data(frame)  # type: ignore[arg-type]
        for event in receiver.events():
            return event
        return None

    return [
        ("WebSocket: receive frame, native (I/O)", lambda f: scan(f, 1 << 20, True), list(frames)),  # type: ignore[arg-type]
        ("WebSocket: send masked frame, native (I/O)", lambda m: data_frame(m), list(outbound)),  # type: ignore[arg-type]
        ("  wsproto: receive frame, not used", receive, frames),
        ("  wsproto: send masked frame, not used", lambda m: client.send(TextMessage(data=m)), list(outbound)),  # type: ignore[arg-type]
    ]


def downlink(path: Path_, n_chunks: int) -> tuple[Pipeline, list[object]]:
    """Fresh downlink state, its stages in CallBridge order, and the inputs (provider deltas)."""
    rate = path.rate_hz or 8000
    pcm = b"".join(caller_audio(n_chunks * CHUNK_MS // FRAME_MS, seed=2))
    pcm8 = ulaw_decode(pcm)
    if rate != 8000:  # model audio at the provider's rate
        pcm_rate = Resampler(8000, rate).process(pcm8)
    else:
        pcm_rate = pcm8
    if path.rate_hz == 0:
        audio, per_chunk = pcm, CHUNK_MS * 8
    else:
        audio, per_chunk = pcm_rate, CHUNK_MS * rate // 1000 * 2
    chunks = [audio[i * per_chunk : (i + 1) * per_chunk] for i in range(n_chunks)]
    messages: list[object] = list(openai_deltas(chunks))

    session = ready_session("pcmu" if path.rate_hz == 0 else "pcm24k")
    twilio = TwilioStream()
    for message in twilio_preamble():
        twilio.receive_message(message)
    list(twilio.events())
    echoes = iter(twilio_mark_echoes(n_chunks))

    def parse(message: object) -> object:
        session.receive_message(message)  # type: ignore[arg-type]
        for event in session.events():
            assert isinstance(event, pv.AudioDelta)
            return event.payload
        return None

    def send_twilio(payload: object) -> object:
        # CallBridge._pace_now: the core's chunk step (media envelope + mark), framed natively (ServerStream.send_media_nowait)
        prefix, suffix, mark = twilio.send_chunk(payload, "item_1")  # type: ignore[arg-type]
        return encode_b64_frame(prefix, payload, suffix, None) + server_frame(mark)  # type: ignore[arg-type]

    def echo(_: object) -> object:
        return twilio.receive_event(next(echoes))

    stages: list[tuple[str, Stage]] = [("provider parse (JSON, base64)", parse)]
    if path.rate_hz:
        if path.rate_hz != 8000:
            down = Resampler(path.rate_hz, 8000)
            stages.append((f"resample {path.rate_hz // 1000}k->8k", lambda pcm: down.process(pcm)))  # type: ignore[arg-type]
        stages.append(("µ-law encode", lambda pcm: ulaw_encode(pcm)))  # type: ignore[arg-type]
    stages += [("Twilio media+mark serialize + frame (native envelope)", send_twilio), ("Twilio mark echo parse", echo)]
    return Pipeline(stages), messages


# --- timing ------------------------------------------------------------------------


def time_pipeline(stages: Sequence[tuple[str, Stage]], inputs: Sequence[object]) -> list[list[int]]:
    """ns per stage per input: ``[stage][input]``, each stage's output feeding the next."""
    clock = time.perf_counter_ns
    fns = [fn for _, fn in stages]
    out: list[list[int]] = [[0] * len(inputs) for _ in fns]
    for j, x in enumerate(inputs):
        for i, fn in enumerate(fns):
            t0 = clock()
            x = fn(x)
            out[i][j] = clock() - t0
    return out


def _identity(x: object) -> object:
    return x


def overhead_ns(n: int = 20000) -> float:
    """The median cost of an identity stage: what every stage's number includes besides its work."""
    return float(statistics.median(time_pipeline([("identity", _identity)], [None] * n)[0]))


def p99(values: Sequence[float]) -> float:
    return float(np.percentile(values, 99))


@dataclasses.dataclass
class StageStat:
    medians: list[float] = dataclasses.field(default_factory=list)
    p99s: list[float] = dataclasses.field(default_factory=list)

    def add(self, values: Sequence[float]) -> None:
        self.medians.append(statistics.median(values))
        self.p99s.append(p99(values))

    def row(self) -> tuple[float, float]:
        return statistics.median(self.medians), statistics.median(self.p99s)


def bench_path(path: Path_, frames: int, repeats: int, bare: float) -> list[dict[str, object]]:
    """Rows for one path: every stage and the totals of both directions."""
    scale_down = CHUNK_MS // FRAME_MS
    audio = caller_audio(frames)
    stats: dict[tuple[str, str], StageStat] = {}
    order: list[tuple[str, str, bool]] = []  # (direction, stage, counted in total)
    for rep in range(repeats + 1):
        up, up_in = uplink(path, audio)
        down, down_in = downlink(path, frames // scale_down)
        per_dir: dict[str, list[float]] = {}
        for direction, pipe, inputs, scale in (("up", up, up_in, 1), ("down", down, down_in, scale_down)):
            times = time_pipeline(pipe.stages, inputs)
            net = [[max(t - bare, 0.0) / scale for t in stage] for stage in times]
            totals = [sum(col) for col in zip(*net)]
            per_dir[direction] = totals
            named = [(name, values, True) for (name, _), values in zip(pipe.stages, net)]
            for name, fn, info_inputs in pipe.info:
                info_times = time_pipeline([(name, fn)], info_inputs)[0]
                named.append((name, [max(t - bare, 0.0) for t in info_times], False))
            named.append(("total", totals, False))
            for name, values, counted in named:
                key = (direction, name)
                if key not in stats:
                    stats[key] = StageStat()
                    order.append((direction, name, counted))
                if rep:  # the first repeat warms caches and branch predictors
                    stats[key].add(values)
        both = [u + d for u, d in zip(per_dir["up"], np.repeat(per_dir["down"], scale_down))]
        key = ("both", "total, up + down per 20 ms")
        if key not in stats:
            stats[key] = StageStat()
            order.append(("both", key[1], False))
        if rep:
            stats[key].add(both)
    rows: list[dict[str, object]] = []
    for direction, name, counted in order:
        median_ns, p99_ns = stats[direction, name].row()
        rows.append(
            {
                "path": path.name,
                "example": path.example,
                "direction": direction,
                "stage": name,
                "counted": counted,  # part of the direction's total
                "median_ns": median_ns,
                "p99_ns": p99_ns,
            }
        )
    return rows


COLUMNS = [
    Column("path", "path", align="<"),
    Column("direction", "dir", align="<"),
    Column("stage", "stage", align="<"),
    Column("median_ns", "median ns", ".0f"),
    Column("p99_ns", "p99 ns", ".0f"),
]

SUMMARY_COLUMNS = [
    Column("path", "path", align="<"),
    Column("example", "example", align="<"),
    Column("up_ns", "up ns", ".0f"),
    Column("down_ns", "down ns", ".0f"),
    Column("both_ns", "both ns", ".0f"),
    Column("both_p99_ns", "both p99", ".0f"),
    Column("share_pct", "% of 33 µs", ".1f"),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run: few frames and repeats")
    parser.add_argument("--frames", type=int, help="frames per repeat (default 3000; quick 200)")
    parser.add_argument("--repeats", type=int, help="timed repeats, after one warm-up (default 7; quick 2)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the header and all rows as JSON")
    args = parser.parse_args(argv)
    args.frames = args.frames if args.frames is not None else (200 if args.quick else 3000)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    if args.frames < 10 or args.repeats < 1:
        parser.error("--frames must be at least 10 and --repeats at least 1")
    problem = check_output_path(args.json, "--json")
    if problem is not None:
        parser.error(problem)
    args.frames -= args.frames % (CHUNK_MS // FRAME_MS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()  # (SIGTERM stops it as Ctrl-C does)
    header = [
        ("date", utc_now()),
        ("CPU", cpu_model()),
        ("Python", sys.version.split()[0]),
        ("frames", f"{args.frames} per repeat, {args.repeats} repeats + 1 warm-up"),
        ("unit", f"ns per {FRAME_MS} ms of audio (downlink: per {CHUNK_MS} ms delta / {CHUNK_MS // FRAME_MS})"),
    ]
    print_header("mediaserver frame-path bench", header)
    bare = overhead_ns()
    rows: list[dict[str, object]] = []
    summary: list[dict[str, object]] = []
    for path in PATHS:
        path_rows = bench_path(path, args.frames, args.repeats, bare)
        totals = {(r["direction"], r["stage"]): r for r in path_rows}
        up, down = totals["up", "total"], totals["down", "total"]
        both = totals["both", "total, up + down per 20 ms"]
        summary.append(
            {
                "path": path.name,
                "example": path.example,
                "up_ns": up["median_ns"],
                "down_ns": down["median_ns"],
                "both_ns": both["median_ns"],
                "both_p99_ns": both["p99_ns"],
                "share_pct": 100 * float(both["median_ns"]) / (FRAME_MS * 1e6 / 600),  # type: ignore[arg-type]
            }
        )
        if rows:
            rows.append({})
        rows += path_rows
    notes = [
        *(["QUICK smoke run, not for comparison (few frames and repeats: the first path also pays the warm-up)."]
          if args.quick else []),
        f"each stage minus an identity stage ({bare:.0f} ns: two clock reads and the call); median / p99 over frames,",
        "median over repeats.  'total' sums the bridge stages per frame; VAD, 'of which' and wsproto rows are not in it.",
        f"downlink: per {CHUNK_MS} ms delta -> one Twilio media + mark + its echo, divided by {CHUNK_MS // FRAME_MS}.",
        "A stage of a few hundred ns or less is within the noise of that subtraction: bench/codecs.py times the",
        "kernels alone, in batches, and is the figure to compare them by.",
    ]
    print(render_table("Table 1. Bridge stages, ns per 20 ms frame", COLUMNS, rows, notes))
    print(
        render_table(
            "Table 2. Per call, both directions, ns per 20 ms of audio",
            SUMMARY_COLUMNS,
            summary,
            [
                "% of 33 µs: share of one core's budget per call per 20 ms at 600 calls per core (20 ms / 600 = 33.3 µs),",
                "spent in the in-process stages alone; WebSocket framing and socket I/O come on top (bench/load.py).",
            ],
        )
    )
    if args.json is not None:
        write_json(args.json, {"header": dict(header), "quick": args.quick, "overhead_ns": bare, "tables": {"stages": [r for r in rows if r], "summary": summary}})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("frame-path bench: interrupted", file=sys.stderr)
        sys.exit(130)
