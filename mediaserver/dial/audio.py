"""Caller audio in and the call recording out, as 8 kHz µ-law / PCM16.

* :func:`read_wav` reads a RIFF/WAVE file (PCM 8/16/24/32-bit, 32-bit
  float, mono or stereo, ``WAVE_FORMAT_EXTENSIBLE`` included, at 4 to
  192 kHz: :data:`WAV_RATES_HZ`) and
  :func:`to_phone` turns it into 8 kHz µ-law: stereo is averaged, 8/16/24 kHz
  go through :class:`mediaserver.codec.Resampler`; other rates (22.05, 44.1,
  48 kHz ...) through a windowed-sinc low-pass and interpolation in numpy,
  when numpy is installed (else a clear :class:`AudioError`).
* :func:`synthesize` speaks text offline with eSpeak NG from the
  ``espeakng-loader`` package (an optional test/bench dependency), in a
  short-lived child interpreter so that eSpeak's global state never leaks
  between utterances.
* :func:`tone` makes a sine (handy for scripted tests), :func:`trim` drops
  the leading and trailing near-silence of an utterance, and
  :func:`write_stereo_wav` writes the two-channel call recording.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import wave
from array import array
from dataclasses import dataclass
from pathlib import Path

from mediaserver.codec import Resampler, ulaw_decode, ulaw_encode

__all__ = [
    "WAV_RATES_HZ",
    "AudioError",
    "Pcm",
    "read_wav",
    "synthesize",
    "to_phone",
    "tone",
    "trim",
    "ulaw_to_pcm",
    "write_stereo_wav",
]

PHONE_RATE = 8000
_CODEC_RATES = (8000, 16000, 24000)  # what mediaserver.codec.Resampler converts between
_FORMAT_PCM, _FORMAT_FLOAT, _FORMAT_EXTENSIBLE = 1, 3, 0xFFFE
_SILENT_PEAK = 64  # PCM16 peak below which a 20 ms frame counts as silence (about -54 dBFS)
# WAV sample rates we read: from below telephone rate (e.g. 6 kHz) to the highest common studio rate.
# Outside it a file is more likely corrupt than real, and resampling 1 Hz "audio" makes no sense.
WAV_RATES_HZ = (4000, 192000)


class AudioError(Exception):
    """Unreadable or unsupported audio; the message is one line, fit for the user."""


@dataclass(frozen=True, slots=True)
class Pcm:
    """Mono signed 16-bit little-endian samples at ``rate_hz``."""

    samples: bytes
    rate_hz: int


# ---------------------------------------------------------------- WAV input


def read_wav(path: str | Path) -> Pcm:
    """A WAV file as mono PCM16 at its own rate (see the module docstring)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AudioError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL or a lone surrogate in a path from a JSON script
        raise AudioError(f"cannot read {str(path)!r}: {exc}") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{path} is not a WAV file (no RIFF/WAVE header)")
    fmt: bytes | None = None
    samples: bytes | None = None
    at = 12
    while at + 8 <= len(data):
        chunk_id, size = data[at : at + 4], struct.unpack_from("<I", data, at + 4)[0]
        body = data[at + 8 : at + 8 + size]
        if chunk_id == b"fmt ":
            fmt = body
        elif chunk_id == b"data":
            samples = body
        at += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16 or samples is None:
        raise AudioError(f"{path}: WAV file without a fmt or data chunk")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID starts with the format code
    width = bits // 8
    if tag not in (_FORMAT_PCM, _FORMAT_FLOAT) or (tag == _FORMAT_FLOAT and bits != 32):
        raise AudioError(f"{path}: only PCM or 32-bit float WAV is supported (format {tag}, {bits} bits)")
    if tag == _FORMAT_PCM and bits not in (8, 16, 24, 32):
        raise AudioError(f"{path}: {bits}-bit PCM is not supported (8, 16, 24 or 32)")
    if channels not in (1, 2):
        raise AudioError(f"{path}: {channels} channels; only mono or stereo is supported")
    if not WAV_RATES_HZ[0] <= rate <= WAV_RATES_HZ[1]:
        low, high = WAV_RATES_HZ
        raise AudioError(f"{path}: a sample rate of {rate} Hz is not supported ({low} to {high} Hz)")
    frame = width * channels
    samples = samples[: len(samples) - len(samples) % frame]
    pcm = _to_pcm16(samples, width, tag == _FORMAT_FLOAT)
    if channels == 2:
        pcm = _downmix(pcm)
    return Pcm(pcm, rate)


def _to_pcm16(data: bytes, width: int, is_float: bool) -> bytes:
    """Little-endian samples of any supported width to PCM16 (keeping the top 16 bits)."""
    if is_float:
        floats = array("f", data)
        if sys.byteorder == "big":
            floats.byteswap()
        return _native_to_le(array("h", (max(-32768, min(32767, round(x * 32767))) for x in floats)))
    if width == 2:
        return data
    out = bytearray(len(data) // width * 2)
    if width == 1:  # unsigned 8-bit: flip the sign bit, use it as the high byte
        out[1::2] = data.translate(bytes((b ^ 0x80) for b in range(256)))
    else:  # 24/32-bit: the two most significant bytes
        out[0::2] = data[width - 2 :: width]
        out[1::2] = data[width - 1 :: width]
    return bytes(out)


def _downmix(stereo: bytes) -> bytes:
    both = _le_to_native(stereo)
    return _native_to_le(array("h", ((left + right) >> 1 for left, right in zip(both[0::2], both[1::2]))))


def _le_to_native(data: bytes) -> array[int]:
    samples = array("h", data)
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _native_to_le(samples: array[int]) -> bytes:
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


# ---------------------------------------------------------------- conversion


def to_phone(pcm: Pcm) -> bytes:
    """PCM16 at any rate to 8 kHz µ-law (see the module docstring for which path is used)."""
    return ulaw_encode(_resample(pcm, PHONE_RATE))


def _resample(pcm: Pcm, rate_hz: int) -> bytes:
    if pcm.rate_hz == rate_hz:
        return pcm.samples
    if pcm.rate_hz in _CODEC_RATES and rate_hz in _CODEC_RATES:
        # The filter delays its output; drop that much so the audio keeps its timing and length.
        resampler = Resampler(pcm.rate_hz, rate_hz)
        out = resampler.process(pcm.samples) + resampler.flush()
        delay = round(resampler.delay_ms * rate_hz / 1000)
        length = len(pcm.samples) // 2 * rate_hz // pcm.rate_hz
        return out[2 * delay : 2 * (delay + length)]
    try:
        import numpy as np
    except ImportError:
        raise AudioError(
            f"{pcm.rate_hz} Hz audio needs numpy to resample (pip install numpy), "
            "or convert it to 8000, 16000 or 24000 Hz first"
        ) from None
    x = np.frombuffer(pcm.samples, dtype="<i2").astype(np.float64)
    if x.size == 0:
        return b""
    # Low-pass at 90 % of the lower Nyquist frequency (Hann-windowed sinc,
    # 8 ms long), then read the filtered signal at the new sample times.
    cutoff = 0.9 * min(pcm.rate_hz, rate_hz) / 2 / pcm.rate_hz  # cycles per input sample
    half = max(8, int(0.004 * pcm.rate_hz))
    n = np.arange(-half, half + 1)
    taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hanning(2 * half + 1)
    # The centred part of the full convolution: one value per input sample, whatever the input's
    # length (mode="same" would give the filter's length for an input shorter than the filter).
    filtered = np.convolve(x, taps / taps.sum())[half : half + x.size]
    times = np.arange(int(x.size * rate_hz / pcm.rate_hz)) * (pcm.rate_hz / rate_hz)
    y = np.interp(times, np.arange(x.size), filtered)
    return bytes(np.clip(np.round(y), -32768, 32767).astype("<i2").tobytes())


def tone(freq_hz: float, ms: int, *, amplitude: float = 0.3) -> bytes:
    """A sine of ``ms`` milliseconds as 8 kHz µ-law."""
    if not 0 < freq_hz < PHONE_RATE / 2:
        raise AudioError(f"tone frequency must be between 0 and 4000 Hz, not {freq_hz}")
    n = PHONE_RATE * ms // 1000
    scale = amplitude * 32767
    samples = array("h", (round(scale * math.sin(2 * math.pi * freq_hz * i / PHONE_RATE)) for i in range(n)))
    return ulaw_encode(_native_to_le(samples))


def trim(ulaw: bytes, frame_bytes: int = 160) -> bytes:
    """Drop whole frames of near-silence at both ends of an utterance (µ-law)."""
    pcm = _le_to_native(ulaw_decode(ulaw))
    loud = [
        i
        for i in range(0, len(ulaw), frame_bytes)
        if max((abs(s) for s in pcm[i : i + frame_bytes]), default=0) >= _SILENT_PEAK
    ]
    if not loud:
        return b""
    return ulaw[loud[0] : loud[-1] + frame_bytes]


# ---------------------------------------------------------------- TTS

_INSTALL_HINT = "pip install 'mediaserver[dial]' (or, in a checkout: pip install -e '.[dial]')"

# The child: argv = library path, data path, voice, words per minute; UTF-8
# text on stdin; 22 050 Hz native-endian int16 samples on stdout.  Constants
# from espeak-ng's speak_lib.h.
_CHILD = r"""
import ctypes, sys
lib_path, data_path, voice, wpm = sys.argv[1:]
SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8, RATE = 2, 1, 1, 1
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
lib = ctypes.CDLL(lib_path)
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
out = sys.stdout.buffer
def collect(wav, n, events):
    if n > 0 and wav:
        out.write(ctypes.string_at(wav, 2 * n))
    return 0
callback = CALLBACK(collect)
if lib.espeak_Initialize(SYNCHRONOUS, 0, data_path.encode(), 0) <= 0:
    sys.exit("espeak_Initialize failed")
lib.espeak_SetSynthCallback(callback)
if lib.espeak_SetVoiceByName(voice.encode()) or lib.espeak_SetParameter(RATE, int(wpm), 0):
    sys.exit(f"eSpeak NG has no voice {voice!r}")
text = sys.stdin.buffer.read()
if lib.espeak_Synth(text, len(text) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None):
    sys.exit("espeak_Synth failed")
out.flush()
"""
_ESPEAK_RATE = 22050


def synthesize(text: str, *, voice: str = "en", words_per_minute: int = 160) -> Pcm:
    """Speak ``text`` with eSpeak NG (offline); mono PCM16 at 22 050 Hz."""
    if not text.strip():
        raise AudioError("nothing to say: the text is empty")
    try:
        import espeakng_loader  # type: ignore[import-untyped]
    except ImportError:
        raise AudioError(f"--say needs the espeakng-loader package: {_INSTALL_HINT}") from None
    argv = [
        sys.executable, "-I", "-S", "-c", _CHILD,
        espeakng_loader.get_library_path(), espeakng_loader.get_data_path(), voice, str(words_per_minute),
    ]  # fmt: skip
    try:
        utf8 = text.encode()
    except UnicodeEncodeError:
        raise AudioError(f"cannot say {text[:40]!r}: it is not valid UTF-8 text") from None
    try:
        done = subprocess.run(argv, input=utf8, capture_output=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AudioError(f"eSpeak NG did not run: {exc}") from None
    if done.returncode != 0:
        raise AudioError(f"eSpeak NG failed: {done.stderr.decode(errors='replace').strip()[-200:]}")
    samples = array("h", done.stdout[: len(done.stdout) // 2 * 2])
    return Pcm(_native_to_le(samples), _ESPEAK_RATE)


# ---------------------------------------------------------------- recording


def ulaw_to_pcm(ulaw: bytes) -> bytes:
    """8 kHz µ-law to PCM16 (for the recording)."""
    return ulaw_decode(ulaw)


def write_stereo_wav(path: str | Path, left: bytes, right: bytes, rate_hz: int = PHONE_RATE) -> None:
    """A 16-bit stereo WAV from two PCM16 channels (the shorter one is padded with silence)."""
    n = max(len(left), len(right))
    left, right = left.ljust(n, b"\0"), right.ljust(n, b"\0")
    frames = bytearray(2 * n)
    frames[0::4], frames[1::4] = left[0::2], left[1::2]
    frames[2::4], frames[3::4] = right[0::2], right[1::2]
    try:
        # Opened here, not by wave.open(path): when that open fails, wave's half-built writer
        # prints a stray "Exception ignored in: Wave_write.__del__" traceback.
        with open(path, "wb") as file, wave.open(file, "wb") as out:
            out.setnchannels(2)
            out.setsampwidth(2)
            out.setframerate(rate_hz)
            out.writeframes(bytes(frames))
    except OSError as exc:
        raise AudioError(f"cannot write {path}: {exc.strerror or exc}") from None
