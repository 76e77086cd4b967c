"""Every kernel that takes audio refuses buffers of another sample type, rather than reading them as PCM16 or codes.

A float32 or big-endian array handed to a kernel that reads raw bytes used to
come back as noise with no error; a 2-D (stereo) array was read as mono.
"""

from __future__ import annotations

import array
import inspect
import pydoc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mediaserver import codec
from mediaserver.codec import EnergyVAD, JitterBuffer, Resampler

PCM = np.round(8000 * np.sin(np.arange(160) / 5)).astype("<i2")  # one 20 ms frame at 8 kHz

PCM_TAKERS: dict[str, Callable[[Any], object]] = {
    "ulaw_encode": codec.ulaw_encode,
    "alaw_encode": codec.alaw_encode,
    "Resampler.process": lambda pcm: Resampler(8000, 16000).process(pcm),
    "EnergyVAD.process": lambda pcm: EnergyVAD().process(pcm),
    "EnergyVAD.observe_agent": lambda pcm: EnergyVAD().observe_agent(pcm),
}


@pytest.mark.parametrize("take", PCM_TAKERS.values(), ids=PCM_TAKERS.keys())
def test_pcm16_kernels_take_bytes_and_little_endian_int16_alike(take: Callable[[Any], object]) -> None:
    expected = take(PCM.tobytes())
    for same in (PCM, PCM.astype("=i2"), array.array("h", PCM.tobytes()), bytearray(PCM.tobytes()),
                 np.frombuffer(PCM.tobytes(), np.uint8), memoryview(PCM.tobytes())):  # fmt: skip
        assert take(same) == expected


@pytest.mark.parametrize("take", PCM_TAKERS.values(), ids=PCM_TAKERS.keys())
@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        ((PCM / 32768).astype(np.float32)[:80], "'f'"),  # 80 floats are 320 bytes: a frame's length, not its samples
        (PCM.astype(">i2"), "'>h'"),
        (PCM.astype(np.int32)[:80], "'i'"),
        (PCM.astype(np.uint16), "'H'"),
        (PCM.view(np.int8), "'b'"),  # 8-bit signed audio is not PCM16 (raw bytes are uint8)
        (array.array("b", PCM.tobytes()), "'b'"),
    ],
)
def test_pcm16_kernels_refuse_other_sample_types(take: Callable[[Any], object], bad: Any, kind: str) -> None:
    with pytest.raises(TypeError, match=f"must be bytes or an array of little-endian int16 \\(PCM16\\), not of items {kind}"):
        take(bad)


@pytest.mark.parametrize("take", PCM_TAKERS.values(), ids=PCM_TAKERS.keys())
@pytest.mark.parametrize("bad", [None, "text", [1, 2], 3])
def test_pcm16_kernels_refuse_what_is_not_a_buffer_naming_its_type(take: Callable[[Any], object], bad: Any) -> None:
    with pytest.raises(TypeError) as error:
        take(bad)
    assert str(error.value).endswith(f" must be a bytes-like object (bytes, bytearray, memoryview, array), not {type(bad).__name__}")


def test_the_jitter_buffer_names_what_is_not_a_frame() -> None:
    with pytest.raises(TypeError, match=r"^frame must be a bytes-like object \(bytes, bytearray, memoryview, array\), not NoneType$"):
        JitterBuffer().push(1, None)
    for fill in (None, 0, ["silence"]):  # (capacity=None and first_seq=None are the defaults; fill=None is not)
        with pytest.raises(TypeError, match=f"^fill must be 'silence', 'fade' or a frame of bytes, got {type(fill).__name__}$"):
            JitterBuffer(fill=fill)


@pytest.mark.parametrize("take", PCM_TAKERS.values(), ids=PCM_TAKERS.keys())
def test_pcm16_kernels_refuse_stereo_and_strided_buffers(take: Callable[[Any], object]) -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        take(np.stack([PCM[:80], PCM[80:]], axis=1))  # 80 stereo frames: 320 bytes
    for strided in (np.repeat(PCM, 2)[::2], memoryview(np.repeat(PCM, 2).tobytes()).cast("h")[::2]):
        with pytest.raises(ValueError, match="must be one contiguous buffer"):
            take(strided)


@pytest.mark.parametrize("take", [*PCM_TAKERS.values(), codec.ulaw_decode, codec.alaw_decode,
                                  lambda frame: JitterBuffer().push(0, frame)],
                         ids=[*PCM_TAKERS.keys(), "ulaw_decode", "alaw_decode", "JitterBuffer.push"])
def test_kernels_refuse_a_scalar_rather_than_take_it_for_one_sample(take: Callable[[Any], object]) -> None:
    for scalar in (PCM[3], np.array(PCM[3]), np.uint8(255), memoryview(np.array(PCM[3]))):  # a[i] for a[i:i+1]
        with pytest.raises(ValueError, match=r"must be one-dimensional \(mono\), got a scalar"):
            take(scalar)


@pytest.mark.parametrize("decode", [codec.ulaw_decode, codec.alaw_decode])
def test_g711_decode_takes_codes_and_refuses_wider_items(decode: Callable[[Any], bytes]) -> None:
    codes = bytes(range(256))
    assert decode(np.frombuffer(codes, np.uint8)) == decode(array.array("b", codes)) == decode(codes)
    with pytest.raises(TypeError, match="must be bytes \\(one code per byte\\), not an array of items 'h'"):
        decode(PCM)  # PCM16 handed to a decoder: 160 samples would have come back as 320 decoded ones


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: Resampler(8000.5, 16000), TypeError, "in_rate must be an int of Hz, got float"),
        (lambda: Resampler(8000, True), TypeError, "out_rate must be an int of Hz, got bool"),
        (lambda: Resampler(2**40, 8000), ValueError, "unsupported rate pair 1099511627776 -> 8000"),
        (lambda: EnergyVAD(margin_db="6"), TypeError, "margin_db must be a number, got str"),
        (lambda: EnergyVAD(margin_db=10**400), ValueError, "margin_db must be a finite number"),
        (lambda: EnergyVAD(attack_ms=True), TypeError, "attack_ms must be an int of ms, got bool"),
        (lambda: EnergyVAD().observe_agent_level("-20"), TypeError, "dbfs must be a number, got str"),
    ],
)
def test_kernel_parameters_of_the_wrong_type_are_clear_errors(make: Callable[[], object], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_kernel_numeric_parameters_take_numpy_scalars() -> None:
    assert (Resampler(np.int64(8000), out_rate=np.int32(24000)).in_rate, Resampler(in_rate=16000, out_rate=8000).ratio) == (8000, (1, 2))
    vad = EnergyVAD(margin_db=np.float64(6.0), attack_ms=np.int64(40))
    assert vad.attack_frames == 2
    vad.observe_agent_level(-10**400)  # very quiet: no echo threshold worth the name
    vad.observe_agent_level(np.float32(-20.0))
    assert vad.agent_level_dbfs == pytest.approx(-20.0)


def test_help_and_inspect_show_each_class_s_real_signature() -> None:
    """The constructors' signatures as Python would show them (from the first line of the class docstring):
    none that Cython got wrong (``str phase='linear', *``, keyword-only arguments shown as positional)."""

    signatures = {cls.__name__: str(inspect.signature(cls)) for cls in (Resampler, JitterBuffer, EnergyVAD)}
    assert signatures == {
        "Resampler": "(in_rate, out_rate, *, phase='linear')",
        "JitterBuffer": "(depth=2, frame_bytes=160, fill='silence', codec='ulaw', *, capacity=None, first_seq=None)",
        "EnergyVAD": (
            "(sample_rate=8000, frame_ms=20, *, attack_ms=0, hangover_ms=160, margin_db=4.0, min_level_dbfs=-55.0, "
            "echo_return_loss_db=20.0, echo_hold_ms=400)"
        ),
    }
    for cls in (Resampler, JitterBuffer, EnergyVAD):
        doc = cls.__doc__ or ""
        assert doc.strip() and not doc.lstrip().startswith(("--", cls.__name__ + "(")), doc[:100]  # (only the prose)
        shown = pydoc.render_doc(cls, renderer=pydoc.plaintext)
        assert f"{cls.__name__}{signatures[cls.__name__]}" in shown
    # each function's signature once: Cython's functions show it themselves (an embedded copy showed it twice)
    for function, signature in ((Resampler.process, "process(self, pcm, /)"), (codec.ulaw_encode, "ulaw_encode(data, /)")):
        assert pydoc.render_doc(function, renderer=pydoc.plaintext).count(signature) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Resampler(8000), "Resampler() takes exactly 2 positional arguments (1 given)"),
        (lambda: Resampler(8000, 16000, "minimum"), "Resampler() takes exactly 2 positional arguments (3 given)"),
        (lambda: Resampler(8000, 16000, phse="minimum"), "Resampler() got an unexpected keyword argument 'phse'"),
        (lambda: JitterBuffer(2, 160, "silence", "ulaw", 64), "JitterBuffer() takes at most 4 positional arguments (5 given)"),
        (lambda: JitterBuffer(dpth=2), "JitterBuffer() got an unexpected keyword argument 'dpth'"),
        (lambda: EnergyVAD(8000, 20, 40), "EnergyVAD() takes at most 2 positional arguments (3 given)"),
        (lambda: EnergyVAD(hangover=400), "EnergyVAD() got an unexpected keyword argument 'hangover'"),
        (lambda: Resampler(8000, 16000, phase=1), "phase must be 'linear' or 'minimum', got int"),
    ],
)
def test_a_wrong_constructor_call_names_the_class(make: Callable[[], object], message: str) -> None:
    """Not ``__cinit__()`` or ``__init__()``, which a user of the codec module never wrote."""
    with pytest.raises(TypeError) as error:
        make()
    assert str(error.value) == message


@pytest.mark.parametrize(
    "data",
    [PCM.view(np.int8), array.array("b", PCM.tobytes()), PCM.astype(">i2"), (PCM / 32768).astype(np.float32)[:80], None, "text"],
)
def test_the_numpy_reference_refuses_what_the_kernels_refuse(data: Any) -> None:
    """The reference (mediaserver.codec._reference) takes audio by the kernels' rule: int8 only as codes."""
    from mediaserver.codec._reference.audiobuf import audio_bytes

    with pytest.raises(TypeError) as reference:
        audio_bytes(data, 2, "PCM16 input")
    with pytest.raises(TypeError) as kernel:
        codec.ulaw_encode(data)
    assert str(reference.value) == str(kernel.value)
    if np.asarray(data).dtype == np.int8:
        assert audio_bytes(data, 1, "codes") == bytes(memoryview(data).cast("B"))  # as codes, it is fine
