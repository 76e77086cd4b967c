"""Offline, deterministic English speech for tests, benches and the call simulator.

Speech is synthesised by the eSpeak NG library and voice data that the
``espeakng-loader`` package ships (no network, no binary fixtures), through
ctypes, then resampled from eSpeak's 22 050 Hz to the rate asked for with
``scipy.signal.resample_poly``.  Results are cached and returned read-only, so
one test cannot corrupt another's audio.

Determinism.  eSpeak NG keeps synthesis state in C statics that no API call
resets (for one, ``wavegen.c`` advances a function-static pitch-flutter
index across utterances), so the same text spoken twice in one process gives different
samples, and even different lengths.  Each text is therefore spoken by a fresh
eSpeak in a short-lived child interpreter (``python -I -S``, stdlib only,
about 30 ms), with eSpeak's random generator and libc's ``rand()`` seeded
first.  The samples then depend only on the text, the voice settings and the
eSpeak NG build, never on what the process spoke before.

Noise and mixing helpers for VAD-style scenarios sit here too: ``noise``
(white, pink or brown, seeded), ``speech_labels`` (per-frame ground truth
from the clean signal) and ``mix`` (speech plus noise at a given SNR).

>>> pcm = synthesize("Hello there.")          # int16, 8 kHz, mono
>>> speech = utterance(["One.", "Two."], pause_ms=500, rate_hz=16000)
>>> noisy, labels = mix(speech, "pink", snr_db=10, seed=1, rate_hz=16000)
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Sequence
from fractions import Fraction

import espeakng_loader
import numpy as np
import numpy.typing as npt
from scipy.signal import resample_poly

__all__ = ["ESPEAK_RATE_HZ", "FULL_SCALE", "NOISE_KINDS", "mix", "noise", "speech_labels", "synthesize", "utterance"]

ESPEAK_RATE_HZ = 22050  # the rate espeak_Initialize reports for its voices

# The child: argv = library, data path, voice, words per minute, pitch; the
# UTF-8 text on stdin; native-endian int16 samples on stdout.  Constants from
# espeak-ng/src/include/espeak-ng/speak_lib.h.
_CHILD = r"""
import ctypes, sys
lib_path, data_path, voice, wpm, pitch = sys.argv[1:]
AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8 = 2, 1, 1
RATE, VOLUME, PITCH = 1, 2, 3                      # espeak_PARAMETER
SEED = 1                                           # any fixed value
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
lib = ctypes.CDLL(lib_path)
libc = ctypes.CDLL(None)
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
out = sys.stdout.buffer
def collect(wav, n, events):
    if n > 0 and wav:
        out.write(ctypes.string_at(wav, 2 * n))
    return 0
callback = CALLBACK(collect)
rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
if rate != 22050:
    sys.exit(f"espeak_Initialize returned {rate}")
lib.espeak_SetSynthCallback(callback)
for what, err in [
    ("espeak_SetVoiceByName", lib.espeak_SetVoiceByName(voice.encode())),
    ("espeak_SetParameter", lib.espeak_SetParameter(RATE, int(wpm), 0)),
    ("espeak_SetParameter", lib.espeak_SetParameter(VOLUME, 100, 0)),
    ("espeak_SetParameter", lib.espeak_SetParameter(PITCH, int(pitch), 0)),
]:
    if err:
        sys.exit(f"{what} failed with espeak_ERROR {err}")
lib.espeak_ng_SetRandSeed(SEED)
libc.srand(SEED)
text = sys.stdin.buffer.read()
err = lib.espeak_Synth(text, len(text) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
if err:
    sys.exit(f"espeak_Synth failed with espeak_ERROR {err}")
out.flush()
"""


def _speak(text: str, voice: str, words_per_minute: int, pitch: int) -> npt.NDArray[np.int16]:
    argv = [
        sys.executable, "-I", "-S", "-c", _CHILD,
        espeakng_loader.get_library_path(), espeakng_loader.get_data_path(),
        voice, str(words_per_minute), str(pitch),
    ]  # fmt: skip
    done = subprocess.run(argv, input=text.encode(), capture_output=True, check=False, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"eSpeak NG failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(done.stdout, dtype=np.int16).copy()


def _resample(pcm: npt.NDArray[np.int16], rate_hz: int) -> npt.NDArray[np.int16]:
    if rate_hz == ESPEAK_RATE_HZ:
        return pcm
    ratio = Fraction(rate_hz, ESPEAK_RATE_HZ)
    y = resample_poly(pcm.astype(np.float64), ratio.numerator, ratio.denominator)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def _readonly(a: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=32)
def _spoken(text: str, voice: str, words_per_minute: int, pitch: int) -> npt.NDArray[np.int16]:
    return _readonly(_speak(text, voice, words_per_minute, pitch))


@functools.lru_cache(maxsize=64)
def synthesize(
    text: str,
    rate_hz: int = 8000,
    *,
    voice: str = "en",
    words_per_minute: int = 160,
    pitch: int = 50,
) -> npt.NDArray[np.int16]:
    """Speak ``text``; return mono int16 PCM at ``rate_hz`` (read-only, cached).

    eSpeak's own short leading and trailing silence is kept.
    """
    if rate_hz <= 0:
        raise ValueError(f"rate_hz must be positive, got {rate_hz}")
    return _readonly(_resample(_spoken(text, voice, words_per_minute, pitch), rate_hz))


@functools.lru_cache(maxsize=64)
def _utterance(sentences: tuple[str, ...], pause_ms: int, rate_hz: int) -> npt.NDArray[np.int16]:
    gap = np.zeros(pause_ms * rate_hz // 1000, np.int16)
    parts: list[npt.NDArray[np.int16]] = [gap]
    for sentence in sentences:
        parts += [synthesize(sentence, rate_hz), gap]
    return _readonly(np.concatenate(parts))


def utterance(sentences: Sequence[str], *, pause_ms: int = 600, rate_hz: int = 8000) -> npt.NDArray[np.int16]:
    """Several sentences with ``pause_ms`` of digital silence before, between and after them."""
    if pause_ms < 0:
        raise ValueError(f"pause_ms must be >= 0, got {pause_ms}")
    return _utterance(tuple(sentences), pause_ms, rate_hz)


# --- noise and mixing ----------------------------------------------------------

NOISE_KINDS = ("white", "pink", "brown")
_NOISE_EXPONENT = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent
_NOISE_LOW_HZ = 20.0  # coloured noise has no energy below this (else brown noise is mostly DC)
FULL_SCALE = 32768.0  # 0 dBFS: the mean power of a full-scale square wave


def noise(kind: str, n_samples: int, *, seed: int, rate_hz: int = 8000) -> npt.NDArray[np.float64]:
    """Stationary Gaussian noise with unit mean power (float64, not yet scaled).

    White is flat; pink falls 3 dB per octave and brown 6 dB per octave from
    20 Hz up (spectral shaping of white noise over the whole length).
    """
    if kind not in _NOISE_EXPONENT:
        raise ValueError(f"kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
    white = np.random.default_rng(seed).standard_normal(n_samples)
    exponent = _NOISE_EXPONENT[kind]
    if exponent == 0.0:
        shaped = white
    else:
        freqs = np.fft.rfftfreq(n_samples, 1.0 / rate_hz)
        gain = np.zeros_like(freqs)
        band = freqs >= _NOISE_LOW_HZ
        gain[band] = freqs[band] ** (-exponent / 2)
        shaped = np.fft.irfft(np.fft.rfft(white) * gain, n_samples)
    result: npt.NDArray[np.float64] = shaped / np.sqrt(np.mean(shaped**2))
    return result


def _frame_power(pcm: npt.ArrayLike, frame_samples: int) -> npt.NDArray[np.float64]:
    x = np.asarray(pcm, dtype=np.float64)
    n = len(x) // frame_samples
    result: npt.NDArray[np.float64] = np.mean(x[: n * frame_samples].reshape(n, frame_samples) ** 2, axis=1)
    return result


def speech_labels(clean: npt.ArrayLike, *, frame_samples: int, below_peak_db: float = 40.0) -> npt.NDArray[np.bool_]:
    """Ground truth per frame: speech where the clean frame's mean power is within
    ``below_peak_db`` of the loudest frame's (pauses are digital silence)."""
    power = _frame_power(clean, frame_samples)
    result: npt.NDArray[np.bool_] = power > power.max() * 10.0 ** (-below_peak_db / 10.0)
    return result


def mix(
    clean: npt.ArrayLike,
    kind: str,
    snr_db: float,
    *,
    seed: int,
    rate_hz: int = 8000,
    frame_ms: int = 20,
    speech_dbfs: float = -26.0,
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.bool_]]:
    """Speech scaled to an active level of ``speech_dbfs`` plus noise ``snr_db`` below it.

    The active level is the mean power over the frames ``speech_labels``
    marks (in the spirit of ITU-T P.56, without its envelope detector), so
    the SNR does not depend on how long the pauses are.  Returns the int16 mix
    (rounded, clipped) and the labels.
    """
    frame_samples = rate_hz * frame_ms // 1000
    labels = speech_labels(clean, frame_samples=frame_samples)
    x = np.asarray(clean, dtype=np.float64)
    active = float(np.mean(_frame_power(x, frame_samples)[labels]))
    speech = x * (FULL_SCALE * 10.0 ** (speech_dbfs / 20.0) / np.sqrt(active))
    room = noise(kind, len(x), seed=seed, rate_hz=rate_hz) * (FULL_SCALE * 10.0 ** ((speech_dbfs - snr_db) / 20.0))
    return np.clip(np.round(speech + room), -32768, 32767).astype(np.int16), labels
