"""Pure parts of ``mediaserver dial``: figures from constructed event logs, the
recording's timeline, percentiles, the script format and WAV/TTS input."""

from __future__ import annotations

import gc
import re
import struct
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from mediaserver.dial import audio, report, script
from mediaserver.dial.timeline import (
    ClearReceived,
    Event,
    FrameSent,
    MarkEchoed,
    MarkReceived,
    MediaReceived,
    Playback,
    StreamEnded,
    StreamStarted,
)

from tests.fakes import band_energy_ratio, dominant_frequency_hz, from_ulaw, pcm16, tone

T0 = 100.0  # the log's clock need not start at zero
SPEECH = b"\x10" * 160
SILENCE = b"\xff" * 160


def frames(start_ms: int, end_ms: int, *, speech: bool) -> list[Event]:
    return [FrameSent(T0 + ms / 1000, SPEECH if speech else SILENCE, speech) for ms in range(start_ms, end_ms, 20)]


def media(at_ms: float, ms: int) -> MediaReceived:
    return MediaReceived(T0 + at_ms / 1000, b"\x00" * (8 * ms))


def test_figures_of_a_constructed_log_to_the_millisecond() -> None:
    events: list[Event] = [
        StreamStarted(T0),
        *frames(0, 200, speech=False),
        *frames(200, 700, speech=True),  # utterance 1: 200-700 ms
        media(1000, 300),  # answer: 1000-1300 ...
        MarkReceived(T0 + 1.0, "m1"),
        media(1250, 200),  # ... queued behind it: 1300-1500
        media(1600, 100),  # 100 ms underrun, then 1600-1700
        MarkEchoed(T0 + 1.3, "m1", cleared=False),
        *frames(700, 2000, speech=False),
        media(2000, 1000),  # the agent talks on its own: 2000-3000 (a 300 ms pause)
        *frames(2000, 2400, speech=False),
        *frames(2400, 2600, speech=True),  # barge-in at 2400
        ClearReceived(T0 + 2.45),  # 50 ms later
        MarkReceived(T0 + 2.44, "m2"),
        MarkEchoed(T0 + 2.45, "m2", cleared=True),
        *frames(2600, 4000, speech=False),
        media(5000, 500),  # 2400 ms after the caller: beyond the gap limit, still the answer
        StreamEnded(T0 + 5.2, "caller hung up (stop sent)"),  # cuts the last answer to 200 ms
    ]
    f = report.call_figures(events)
    assert f.first_audio_ms == 1000.0
    assert f.turns == (report.Turn(200.0, 700.0, 300.0), report.Turn(2400.0, 2600.0, 2400.0))
    assert f.barge_ins == (report.BargeIn(2400.0, 50.0, cleared=True),)
    # 1500-1600 is an underrun; 1700-2000 too (300 ms, no caller speech, no clear);
    # 2450-5000 is not (a clear, a caller turn, and longer than the limit).
    assert (f.underruns, f.underrun_ms) == (2, 400.0)
    assert f.duration_ms == 5200.0
    assert (f.agent_received_ms, f.agent_played_ms) == (2100.0, 300 + 200 + 100 + 450 + 200)
    assert (f.clears, f.marks_received, f.marks_played, f.marks_cleared) == (1, 2, 1, 1)
    assert f.speech_sent_ms == 700.0
    assert report.call_figures(events, gap_limit_ms=200).underruns == 1  # the 300 ms pause is a pause


def test_barge_in_without_a_clear_and_a_turn_with_no_answer() -> None:
    events: list[Event] = [
        StreamStarted(T0),
        media(0, 500),  # a greeting, 0-500
        *frames(0, 100, speech=False),
        *frames(100, 300, speech=True),  # talks over it; the agent goes on to its end
        *frames(300, 1000, speech=False),
        *frames(1000, 1200, speech=True),  # no answer before the next utterance
        *frames(1200, 1400, speech=False),
        *frames(1400, 1600, speech=True),  # no answer at all
        StreamEnded(T0 + 2.0, "the server closed the stream (1011 internal error)", error=True),
    ]
    f = report.call_figures(events)
    assert f.first_audio_ms == 0.0
    assert f.barge_ins == (report.BargeIn(100.0, 400.0, cleared=False),)
    assert [t.latency_ms for t in f.turns] == [None, None, None]  # the greeting started before the caller spoke
    assert f.error and f.ended.startswith("the server closed")
    text = report.format_call("CA1", f)
    assert "audio ran out, no clear" in text and text.count("no answer") == 3


def test_empty_call() -> None:
    f = report.call_figures([StreamStarted(T0), StreamEnded(T0 + 1, "caller hung up (stop sent)")])
    assert (f.first_audio_ms, f.turns, f.barge_ins, f.underruns, f.duration_ms) == (None, (), (), 0, 1000.0)


def test_percentiles_and_summary() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [report.percentile(values, p) for p in (50, 95, 99, 100)] == [50.0, 95.0, 99.0, 100.0]
    assert report.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        report.percentile([], 50)
    calls = [
        report.call_figures(
            [StreamStarted(T0), *frames(0, 200, speech=True), *frames(200, 400, speech=False),
             media(200 + latency, 100), StreamEnded(T0 + 1, "caller hung up (stop sent)")]  # fmt: skip
        )
        for latency in (100, 300, 200)
    ]
    summary = report.summarize(calls, failed=1)
    assert (summary.calls, summary.failed) == (4, 1)
    assert summary.turn_latency_ms == report.Stats(3, 200.0, 300.0, 300.0, 300.0)
    assert summary.first_audio_ms == report.Stats(3, 400.0, 500.0, 500.0, 500.0)
    assert summary.barge_in_reaction_ms is None
    table = report.format_summary(summary)
    assert "4 calls, 1 failed" in table
    assert table.splitlines()[3].split() == ["turn", "latency", "3", "200", "300", "300", "300"]


def test_recording_places_each_side_on_the_common_timeline() -> None:
    agent = bytes(range(0, 200, 2)) * 8  # 800 bytes = 100 ms
    events: list[Event] = [
        StreamStarted(T0),
        FrameSent(T0, SPEECH, True),
        FrameSent(T0 + 0.02, SILENCE, False),
        MediaReceived(T0 + 0.01, agent),  # plays 10-110 ms
        MediaReceived(T0 + 0.05, agent),  # queued: 110-210 ms
        ClearReceived(T0 + 0.16),  # cut at 160 ms
        StreamEnded(T0 + 0.3, "caller hung up (stop sent)"),
    ]
    caller_side, agent_side = report.recording(events)
    assert caller_side == SPEECH + SILENCE
    assert agent_side == b"\xff" * 80 + agent + agent[:400]


def test_playback_run_tracking() -> None:
    playback = Playback()
    assert playback.playing_since(0.0) is None
    playback.media(b"\x00" * 800, 1.0)
    playback.media(b"\x00" * 800, 1.05)  # queued: the same stretch
    assert playback.playing_since(1.15) == 1.0
    assert playback.playing_since(1.21) is None  # finished at 1.2
    playback.media(b"\x00" * 800, 1.3)
    assert playback.playing_since(1.31) == 1.3
    assert playback.clear(1.31) == []
    playback.media(b"\x00" * 800, 1.31)  # right after a clear: a new stretch
    assert playback.playing_since(1.32) == 1.31


# ----------------------------------------------------------------- scripts


def test_text_and_json_scripts_parse_to_the_same_steps(tmp_path: Path) -> None:
    text = """
        # a comment
        pause 500
        say Hello, world # not a comment on a say line
        wait
        wait 8000   # at most 8 s
        barge-in 800
        tone 440 250
        play sub/question.wav
    """
    steps = script.parse_script(text, tmp_path)
    assert steps == [
        script.Pause(500),
        script.Say("Hello, world # not a comment on a say line"),
        script.Wait(),
        script.Wait(8000),
        script.BargeIn(800),
        script.Tone(440.0, 250),
        script.Play(tmp_path / "sub" / "question.wav"),
    ]
    as_json = (
        '[{"pause": 500}, {"say": "Hello, world # not a comment on a say line"}, {"wait": null}, {"wait": 8000},'
        ' {"barge-in": 800}, {"tone": [440, 250]}, {"play": "sub/question.wav"}]'
    )
    assert script.parse_script(as_json, tmp_path) == steps


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shout hello", "line 1: unknown step 'shout'"),
        ("pause\n", "line 1: pause needs a length in ms"),
        ("\npause -5", "line 2: milliseconds must not be negative"),
        ("tone high 100", "line 1: 'high' is not a frequency"),
        ("barge-in soon", "line 1: 'soon' is not a whole number of milliseconds"),
        ('[{"say": "a", "pause": 1}]', "entry 1: each entry is an object with one key"),
        ("[1,", "invalid JSON"),
        # JSON numbers are read as strictly as the text format's: whole milliseconds, and no more than an hour.
        ('[{"pause": 1.5}]', "entry 1: 1.5 is not a whole number of milliseconds"),
        ('[{"wait": true}]', "entry 1: true is not a whole number of milliseconds"),
        ('[{"pause": 1e400}]', "entry 1: Infinity is not a whole number of milliseconds"),
        ('[{"pause": NaN}]', "entry 1: NaN is not a whole number of milliseconds"),
        ('[{"barge-in": [500, [1]]}]', r"entry 1: \[1\] is not a whole number of milliseconds"),
        ('[{"tone": [true, 500]}]', "entry 1: True is not a frequency"),
        ('[{"tone": [1000, 1e9]}]', "entry 1: a step may last at most 3600000 ms (an hour)"),
        ("wait 3600001", "line 1: a step may last at most 3600000 ms (an hour)"),
        ("barge-in 100 99999999999999999999999", "line 1: a step may last at most 3600000 ms"),
    ],
)
def test_script_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(script.ScriptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        script.parse_script(text)


def test_script_lengths_may_be_whole_json_floats_up_to_an_hour() -> None:
    steps = script.parse_script('[{"pause": 1e3}, {"wait": "250"}, {"tone": [440, 3600000.0]}]')
    assert steps == [script.Pause(1000), script.Wait(250), script.Tone(440.0, script.MAX_MS)]


def test_load_script_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(script.ScriptError, match="cannot read script"):
        script.load_script(tmp_path / "nope.txt")


def test_prepare_trims_silence_and_renders_tones(tmp_path: Path) -> None:
    pcm = np.concatenate([np.zeros(800, np.int16), tone(440, 300), np.zeros(1600, np.int16)])
    path = tmp_path / "padded.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(pcm.astype("<i2").tobytes())
    [speak, beep] = script.prepare([script.Play(path), script.Tone(1000, 100)])
    assert isinstance(speak, script.Speak) and isinstance(beep, script.Speak)
    assert len(speak.ulaw) == 2400  # 100 ms of leading and 200 ms of trailing silence gone
    assert dominant_frequency_hz(from_ulaw(speak.ulaw), 8000) == pytest.approx(440, abs=27)
    assert len(beep.ulaw) == 800
    with pytest.raises(audio.AudioError, match="is silent"):
        script.prepare([script.Tone(1000, 0)])


def test_prepare_says_which_wav_file_is_silent_without_script_words(tmp_path: Path) -> None:
    path = tmp_path / "quiet.wav"
    write_wav(path, np.zeros(800, np.int16), 8000, width=2, channels=1)
    # The same words for `--wav quiet.wav` and a `play quiet.wav` step.
    with pytest.raises(audio.AudioError) as raised:
        script.prepare([script.Play(path)])
    assert str(raised.value) == f"the WAV file {path} is silent: nothing to say"


# ----------------------------------------------------------------- WAV input


def write_wav(path: Path, signal: np.ndarray, rate: int, *, width: int, channels: int, fmt: str = "pcm") -> None:
    """A WAV file written by hand, so that every format we claim to read is covered."""
    x = np.repeat(signal[:, None], channels, axis=1).reshape(-1) / 32768.0
    if fmt == "float":
        data, tag, bits = x.astype("<f4").tobytes(), 3, 32
    elif width == 1:
        data, tag, bits = np.round(x * 127 + 128).astype(np.uint8).tobytes(), 1, 8
    else:
        ints = np.round(x * (2 ** (8 * width - 1) - 1)).astype("<i8")
        raw = ints.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :width]
        data, tag, bits = raw.tobytes(), 1, 8 * width
    block = channels * bits // 8
    if fmt == "extensible":
        guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt_chunk = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0) + guid
    else:
        fmt_chunk = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


@pytest.mark.parametrize(
    ("rate", "width", "channels", "fmt"),
    [
        (8000, 2, 1, "pcm"),
        (16000, 2, 2, "pcm"),
        (24000, 3, 1, "pcm"),
        (22050, 1, 1, "pcm"),
        (44100, 4, 2, "extensible"),
        (48000, 4, 1, "float"),
    ],
)
def test_wav_files_of_every_common_kind_become_8khz_ulaw(
    tmp_path: Path, rate: int, width: int, channels: int, fmt: str
) -> None:
    path = tmp_path / "in.wav"
    write_wav(path, tone(700, 500, rate, amplitude=0.5), rate, width=width, channels=channels, fmt=fmt)
    ulaw = audio.to_phone(audio.read_wav(path))
    assert abs(len(ulaw) - 4000) <= 2  # 500 ms at 8 kHz
    pcm = from_ulaw(ulaw)[400:-400]  # away from the filters' edges
    assert dominant_frequency_hz(pcm, 8000) == pytest.approx(700, abs=10)
    assert band_energy_ratio(pcm, 8000, 700) > 0.95
    rms = np.sqrt(np.mean(pcm.astype(np.float64) ** 2))
    assert rms == pytest.approx(0.5 * 32767 / np.sqrt(2), rel=0.08)


@pytest.mark.parametrize("rate", [44100, 22050])
def test_resampling_works_for_any_input_length(rate: int) -> None:
    """Shorter than the filter too: each output sample is what the same samples followed by
    silence give (the filter sees zeros beyond both ends, whatever the length)."""
    signal = np.random.default_rng(1).normal(0, 8000, 2000).astype("<i2")
    taps = 2 * int(0.004 * rate) + 1
    for n in sorted({0, 1, 2, 5, 100, taps - 1, taps, taps + 1, *range(3, 3 * taps, 37)}):
        short = pcm16(audio._resample(audio.Pcm(signal[:n].tobytes(), rate), 8000))
        assert len(short) == n * 8000 // rate
        padded = np.concatenate([signal[:n], np.zeros(taps, "<i2")])
        longer = pcm16(audio._resample(audio.Pcm(padded.tobytes(), rate), 8000))
        np.testing.assert_allclose(short, longer[: len(short)], atol=1)


def test_wav_rates_outside_4_to_192_khz_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.wav"
    for rate in (1, 3999, 192001, 2**32 // 2 - 1):
        write_wav(path, tone(700, 10), rate, width=2, channels=1)
        with pytest.raises(audio.AudioError) as raised:
            audio.read_wav(path)
        assert str(raised.value) == f"{path}: a sample rate of {rate} Hz is not supported (4000 to 192000 Hz)"
    for rate in audio.WAV_RATES_HZ:
        write_wav(path, tone(700, 10), rate, width=2, channels=1)
        assert audio.read_wav(path).rate_hz == rate


def test_a_recording_that_cannot_be_written_is_one_error_and_no_stray_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    for path in (tmp_path, tmp_path / "missing" / "x.wav"):
        with pytest.raises(audio.AudioError, match=f"cannot write {re.escape(str(path))}: "):
            audio.write_stereo_wav(path, b"\0\0", b"\0\0")
        gc.collect()
    assert unraisable == []  # wave's half-built writer used to complain from __del__


def test_bad_wav_files_give_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.wav"
    path.write_bytes(b"ID3 not a wav at all")
    with pytest.raises(audio.AudioError, match="not a WAV file"):
        audio.read_wav(path)
    write_wav(path, tone(700, 10), 8000, width=2, channels=1)
    path.write_bytes(path.read_bytes().replace(b"\x01\x00\x01\x00", b"\x02\x00\x01\x00", 1))  # ADPCM
    with pytest.raises(audio.AudioError, match="only PCM"):
        audio.read_wav(path)
    with pytest.raises(audio.AudioError, match="cannot read"):
        audio.read_wav(tmp_path / "missing.wav")


def test_unusual_rates_without_numpy_give_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)
    assert len(audio.to_phone(audio.Pcm(b"\x00\x00" * 1600, 16000))) == 800  # the codec's rates need no numpy
    with pytest.raises(audio.AudioError, match="needs numpy"):
        audio.to_phone(audio.Pcm(b"\x00\x00" * 4410, 44100))


# ----------------------------------------------------------------- TTS


def test_say_speaks_offline() -> None:
    [speak] = script.prepare([script.Say("Hello there.")])
    assert isinstance(speak, script.Speak)
    pcm = from_ulaw(speak.ulaw)
    assert 0.3 < len(pcm) / 8000 < 2.0
    assert np.abs(pcm[:160]).max() >= 64 and np.abs(pcm[-160:]).max() >= 64  # trimmed to the words
    assert band_energy_ratio(pcm, 8000, 2000, width_hz=1900) > 0.9  # telephone band speech


def test_say_without_espeak_tells_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    with pytest.raises(audio.AudioError, match=re.escape("pip install 'mediaserver[dial]'")):
        audio.synthesize("hello")


def test_say_with_barge_in_after_talks_over_the_answer() -> None:
    import argparse

    from mediaserver.dial import cli

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    steps = cli._steps(parser.parse_args(["--say", "Hi there", "--barge-in-after", "700"]))
    assert steps == [script.Pause(500), script.Say("Hi there"), script.BargeIn(700), script.Say("Hi there")]
    assert cli._steps(parser.parse_args([])) == []  # silence only: listen for a greeting


def test_record_check_looks_at_the_files_the_calls_write(tmp_path: Path) -> None:
    import argparse

    from mediaserver.dial.cli import _record_problem

    (tmp_path / "rec").mkdir()  # several calls write rec-<CallSid>.wav next to it: a folder named rec is fine
    several = argparse.Namespace(no_record=False, calls=2, record=str(tmp_path / "rec"))
    assert _record_problem(several) is None
    one = argparse.Namespace(no_record=False, calls=1, record=str(tmp_path / "rec"))  # one call writes rec itself
    assert _record_problem(one) == f"cannot write {tmp_path / 'rec'}: Is a directory"
