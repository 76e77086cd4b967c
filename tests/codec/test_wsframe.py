"""The WebSocket frame kernels against a pure-Python reference and against wsproto's own parser."""

from __future__ import annotations

import base64
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from mediaserver._native._wsframe import DONE, INCOMPLETE, OTHER, encode_b64_frame, encode_frame, mask, scan

# Payload lengths at and around the edges of the 7-, 16- and 64-bit length encodings.
LENGTHS = [0, 1, 3, 4, 5, 7, 8, 9, 125, 126, 127, 65535, 65536, 65537]
LIMIT = 1 << 20


def ref_mask(data: bytes, key: bytes) -> bytes:
    """The RFC 6455 definition, byte by byte."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def ref_frame(opcode: int, payload: bytes, key: bytes | None, *, first: int | None = None) -> bytes:
    """A frame built by the book; ``first`` overrides the first byte (FIN/RSV/opcode)."""
    n = len(payload)
    bit = 0x80 if key is not None else 0
    if n < 126:
        head = bytes((opcode if first is None else first, bit | n))
    elif n < 65536:
        head = bytes((opcode if first is None else first, bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((opcode if first is None else first, bit | 127)) + struct.pack("!Q", n)
    return head + (key + ref_mask(payload, key) if key is not None else payload)


def wsproto_messages(data: bytes, *, masked: bool) -> list[str | bytes]:
    """Every whole message wsproto parses from ``data`` (its receiving side: server iff masked)."""
    proto = FrameProtocol(client=not masked, extensions=[])
    proto.receive_bytes(data)
    out: list[str | bytes] = []
    parts: list[str | bytes] = []
    for frame in proto.received_frames():
        assert frame.opcode in (Opcode.TEXT, Opcode.BINARY) and isinstance(frame.payload, (str, bytes))
        parts.append(frame.payload)
        if frame.message_finished:
            out.append("".join(parts) if isinstance(parts[0], str) else b"".join(parts))  # type: ignore[arg-type]
            parts = []
    return out


payloads = st.one_of(
    st.text(max_size=140),
    st.binary(max_size=140),
    st.integers(min_value=120, max_value=300).map(lambda n: random.Random(n).randbytes(n)),
)


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_mask_matches_the_reference_and_is_its_own_inverse(data: bytes, key: bytes) -> None:
    assert mask(data, key) == ref_mask(data, key)
    assert mask(mask(data, key), key) == data


@pytest.mark.parametrize("n", LENGTHS)
def test_mask_at_every_length_class(n: int) -> None:
    data = random.Random(n).randbytes(n)
    assert mask(data, b"\x01\x80\xfe\x7f") == ref_mask(data, b"\x01\x80\xfe\x7f")


def test_bad_keys_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        mask(b"abc", b"abc")
    with pytest.raises(ValueError, match="4 bytes"):
        encode_frame(True, b"abc", b"abcde")


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("text", [True, False])
def test_encode_frame_is_the_reference_frame(n: int, text: bool) -> None:
    payload = b"a" * n if text else random.Random(n).randbytes(n)
    opcode = 0x81 if text else 0x82
    assert encode_frame(text, payload) == ref_frame(opcode, payload, None)
    assert encode_frame(text, payload, b"wxyz") == ref_frame(opcode, payload, b"wxyz")
    # and wsproto reads both back as the same message
    expected = payload.decode() if text else payload
    assert wsproto_messages(encode_frame(text, payload), masked=False) == [expected]
    assert wsproto_messages(encode_frame(text, payload, b"wxyz"), masked=True) == [expected]
    # key=True: a fresh key from the native pool, in the header, the payload masked with it
    fresh = encode_frame(text, payload, True)
    head = len(fresh) - n - 4
    assert fresh[1] & 0x80 and fresh[: head] == ref_frame(opcode, payload, b"wxyz")[:head]
    assert fresh == ref_frame(opcode, payload, fresh[head : head + 4])
    assert wsproto_messages(fresh, masked=True) == [expected]


@given(st.binary(max_size=400), st.binary(max_size=60), st.binary(max_size=8), st.one_of(st.none(), st.binary(min_size=4, max_size=4)))
def test_encode_b64_frame_is_the_text_frame_of_prefix_base64_suffix(data: bytes, prefix: bytes, suffix: bytes, key: bytes | None) -> None:
    payload = prefix + base64.b64encode(data) + suffix
    assert encode_b64_frame(prefix, data, suffix, key) == ref_frame(0x81, payload, key)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 90, 91, 92, 93, 94, 95, 49149, 49150, 49151, 49152])
def test_encode_b64_frame_at_every_length_class(n: int) -> None:
    """Base64 lengths around the 126 and 65536 length encodings (with a 2-byte prefix and suffix)."""
    data = random.Random(n).randbytes(n)
    payload = b'{"' + base64.b64encode(data) + b'"}'
    assert encode_b64_frame(b'{"', data, b'"}', b"\x00\xff\x10\x80") == ref_frame(0x81, payload, b"\x00\xff\x10\x80")
    assert wsproto_messages(encode_b64_frame(b'{"', data, b'"}', b"wxyz"), masked=True) == [payload.decode()]
    assert wsproto_messages(encode_b64_frame(b'{"', data, b'"}', True), masked=True) == [payload.decode()]
    with pytest.raises(ValueError, match="4 bytes"):
        encode_b64_frame(b"", data, b"", b"abc")


def _stream(messages: list[str | bytes], masked: bool, seed: int) -> tuple[bytes, list[int]]:
    """The frames of ``messages`` back to back, and the offset where each frame ends."""
    rng = random.Random(seed)
    data, ends = b"", []
    for message in messages:
        key = rng.randbytes(4) if masked else None
        if isinstance(message, str):
            data += ref_frame(0x81, message.encode(), key)
        else:
            data += ref_frame(0x82, message, key)
        ends.append(len(data))
    return data, ends


@settings(max_examples=60, deadline=None)
@given(st.lists(payloads, max_size=4), st.booleans(), st.integers(0, 2**32))
def test_scan_at_every_split_point_matches_wsproto(messages: list[str | bytes], masked: bool, seed: int) -> None:
    data, ends = _stream(messages, masked, seed)
    assert wsproto_messages(data, masked=masked) == messages
    assert scan(data, LIMIT, masked) == (messages, len(data), DONE)
    for cut in range(len(data) + 1):
        whole = sum(1 for end in ends if end <= cut)
        consumed = ends[whole - 1] if whole else 0
        got, used, why = scan(data[:cut], LIMIT, masked)
        assert got == messages[:whole] and used == consumed
        assert why == (DONE if consumed == cut else INCOMPLETE)
        # the rest of the stream, scanned on its own, completes it
        rest = scan(data[consumed:], LIMIT, masked)
        assert rest == (messages[whole:], len(data) - consumed, DONE)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("masked", [True, False])
def test_scan_every_length_class_with_cuts_around_the_header(n: int, masked: bool) -> None:
    payload = random.Random(n).randbytes(n)
    data, _ = _stream([payload, "after"], masked, n)
    first = len(data) - len(_stream(["after"], masked, 0)[0])
    assert scan(data, LIMIT, masked) == ([payload, "after"], len(data), DONE)
    assert wsproto_messages(data, masked=masked) == [payload, "after"]
    for cut in [*range(0, 16), first - 1, first, first + 1]:
        if 0 <= cut <= len(data):
            got, used, why = scan(data[:cut], LIMIT, masked)
            if cut == len(data):
                expected: tuple[list[str | bytes], int] = ([payload, "after"], len(data))
            else:
                expected = ([payload], first) if cut >= first else ([], 0)
            assert (got, used) == expected and why in (DONE, INCOMPLETE)


def _unusual(masked: bool) -> list[tuple[str, bytes]]:
    """Frames the scanner must leave to wsproto, each as it would arrive."""
    key = b"\x11\x22\x33\x44" if masked else None
    wrong_key = None if masked else b"\x11\x22\x33\x44"
    return [
        ("ping", ref_frame(0x89, b"hi", key)),
        ("close", ref_frame(0x88, struct.pack("!H", 1000), key)),
        ("fragment", ref_frame(0x01, b"part", key)),
        ("continuation", ref_frame(0x80, b"part", key)),
        ("rsv1", ref_frame(0xC1, b"x", key)),
        ("rsv3", ref_frame(0x92, b"x", key)),
        ("bad opcode", ref_frame(0x83, b"x", key)),
        ("wrong masking", ref_frame(0x81, b"x", wrong_key)),
        ("bad utf-8", ref_frame(0x81, b"\xff\xfe", key)),
        ("cut utf-8", ref_frame(0x81, "é".encode()[:1], key)),
        ("oversize", ref_frame(0x82, b"y" * 200, key)),
        ("16-bit length under 126", bytes((0x82, (0x80 if masked else 0) | 126, 0, 5)) + (key or b"") + b"z" * 5),
        ("64-bit length under 65536", bytes((0x82, (0x80 if masked else 0) | 127)) + struct.pack("!Q", 5) + (key or b"") + b"z" * 5),
        ("64-bit length with the top bit", bytes((0x82, (0x80 if masked else 0) | 127)) + struct.pack("!Q", 1 << 63)),
    ]


@pytest.mark.parametrize("masked", [True, False])
def test_scan_stops_at_the_first_unusual_frame(masked: bool) -> None:
    before, _ = _stream(["one", b"two"], masked, 1)
    after, _ = _stream(["three"], masked, 2)
    for name, frame in _unusual(masked):
        got, used, why = scan(before + frame + after, 100, masked)
        assert (got, used, why) == (["one", b"two"], len(before), OTHER), name


@pytest.mark.parametrize("masked", [True, False])
def test_what_the_scanner_refuses_wsproto_refuses_or_handles_otherwise(masked: bool) -> None:
    """A sanity check of the list above: none of these is a plain whole data frame for wsproto."""
    for name, frame in _unusual(masked):
        if name == "oversize":
            continue  # plain for wsproto; our limit, not the protocol's
        proto = FrameProtocol(client=not masked, extensions=[])
        proto.receive_bytes(frame)
        try:
            frames = list(proto.received_frames())
        except ParseFailed:
            continue
        assert not (
            len(frames) == 1 and frames[0].opcode in (Opcode.TEXT, Opcode.BINARY) and frames[0].message_finished
        ), name


def test_a_negative_or_zero_limit() -> None:
    empty = encode_frame(False, b"")
    assert scan(empty + encode_frame(False, b"x"), 0, False) == ([b""], len(empty), OTHER)
    assert scan(empty, -1, False) == ([], 0, OTHER)
