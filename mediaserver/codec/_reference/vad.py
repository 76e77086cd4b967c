"""Energy VAD, written from the spec in plain Python and numpy.

The native kernel (``native/_vad.pyx``) must reach exactly the same decision,
and the same state, on every frame.  That holds by construction rather than
within a tolerance:

* frame energy is computed in 64-bit integers (exact in both), then each
  block's integer is converted to double and the blocks are summed in order
  (``np.cumsum`` accumulates sequentially, like the kernel's loop);
* every later step is a short, fixed sequence of IEEE double operations
  (no fused multiply-add: setup.py builds with ``-ffp-contract=off``), and
  the few constants that need ``exp``/``pow`` are derived once, in Python,
  by the same formulas in both.

Algorithm (the per-frame order matters, it is part of the spec):

1. ``e`` = mean power of the frame after removing, in every 2.5 ms block, the
   block's least-squares line (mean and slope).  That is a high-pass: about
   -3 dB at 350 Hz, -10 dB at 200 Hz, -21 dB at 100 Hz, -33 dB at 50 Hz; the
   telephone band's lower edge.  It takes DC, hum and most of the energy of
   rumble, traffic and brown-ish noise out of the measurement, which is what
   makes a plain energy detector hold up in coloured noise.  Full scale is a
   full-scale square wave (0 dBFS; a full-scale sine is -3 dBFS).
2. Threshold = max(floor x margin, min level, agent envelope x echo loss).
   ``active = e > threshold``.  Until a frame reaches the min level the floor
   is unset, so leading digital silence does not pin it at -100 dBFS.  The
   margin is ``margin_db`` or more: 1 + 8 x *spread* (in power, capped at
   10 dB), where spread is the mean of |e / floor - 1| over frames within
   the margin and more than 200 ms after the last active frame (1 s time
   constant, starting at 0.3, i.e. a cautious 5.3 dB).  White noise has a small spread and gets the minimum margin;
   noise whose frame energies swing more (brown, rumble) gets a larger one.
3. Hysteresis (pipecat's four states): QUIET -> STARTING -> SPEAKING ->
   STOPPING.  ``speaking`` turns True on the (attack_frames + 1)-th
   consecutive active frame and stays True for hangover_frames inactive
   frames after the last active one.
4. Noise floor: falls fast towards quieter frames (20 ms time constant),
   follows frames within the margin with a 400 ms time constant, and rises at
   only 4 dB/s under louder (speech-like) frames.  It never stays below the
   quietest frame of the last 2 s (four 500 ms sub-windows, as in Martin's
   minimum statistics), so a step up in noise is learnt within about 2 s.
5. Agent envelope: ``observe_agent`` raises it to the agent audio's level and
   holds it for the audio's duration plus ``echo_hold_ms`` (every observation
   for its own time: a quieter one outlasting a louder one holds the envelope
   at its level once the louder one's hold ends); then it decays
   at 150 dB/s.  Echo of the agent's own voice arriving up to
   ``echo_hold_ms`` late stays under the raised threshold.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

SAMPLE_RATES_HZ = (8000, 16000, 24000, 32000, 48000)
BLOCK_DIVISOR = 400  # block = sample_rate / 400 = 2.5 ms (20 samples at 8 kHz)
FLOOR_FALL_MS = 20.0  # time constant towards frames below the floor
FLOOR_TRACK_MS = 400.0  # time constant towards frames within the margin
FLOOR_RISE_DB_PER_S = 4.0  # rise under speech-like frames
FLOOR_MIN = 1e-10  # -100 dBFS: keeps the floor positive, so it can rise again
WINDOW_MS = 500  # minimum-statistics sub-window
WINDOW_COUNT = 4  # sub-windows: the floor is never below the 2 s minimum
SPREAD_GAIN = 8.0  # margin >= 1 + SPREAD_GAIN * spread (in power)
SPREAD_MS = 1000.0  # time constant of the spread estimate
SPREAD_INIT = 0.3  # a fresh detector starts with a 5.3 dB margin
SPREAD_GAP_MS = 200  # the spread learns only this long after the last active frame
MARGIN_CAP_DB = 10.0  # the spread never asks for more than this
ECHO_RELEASE_DB_PER_S = 150.0  # decay of the agent envelope after its hold
ECHO_STEPS = 16  # agent levels held at once (each with its own end)
ECHO_ENV_MIN = 1e-12  # below -120 dBFS the agent envelope is dropped to 0

MAX_MS = 60_000  # bound for attack, hangover and echo hold

QUIET, STARTING, SPEAKING, STOPPING = 0, 1, 2, 3


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class EnergyVAD:
    """Reference for :class:`mediaserver.codec.EnergyVAD` (same parameters, no validation)."""

    def __init__(
        self,
        sample_rate: int = 8000,
        frame_ms: int = 20,
        *,
        attack_ms: int = 0,
        hangover_ms: int = 160,
        margin_db: float = 4.0,
        min_level_dbfs: float = -55.0,
        echo_return_loss_db: float = 20.0,
        echo_hold_ms: int = 400,
    ) -> None:
        self.frame_samples = sample_rate * frame_ms // 1000
        self.block = sample_rate // BLOCK_DIVISOR
        self.blocks = self.frame_samples // self.block
        b = self.block
        self.t_sq = b * (b * b - 1) // 3  # sum of (2i - (b - 1))^2
        self.norm = 1.0 / (b * self.t_sq * self.frame_samples * (1 << 30))
        self.margin = 10.0 ** (margin_db / 10.0)
        self.margin_cap = max(10.0 ** (MARGIN_CAP_DB / 10.0), self.margin)
        self.spread_coef = 1.0 - math.exp(-frame_ms / SPREAD_MS)
        self.min_e = 10.0 ** (min_level_dbfs / 10.0)
        self.echo_loss = 10.0 ** (-echo_return_loss_db / 10.0)
        self.fall = 1.0 - math.exp(-frame_ms / FLOOR_FALL_MS)
        self.track = 1.0 - math.exp(-frame_ms / FLOOR_TRACK_MS)
        self.rise = 10.0 ** (FLOOR_RISE_DB_PER_S * frame_ms / 10000.0)
        self.release = 10.0 ** (-ECHO_RELEASE_DB_PER_S * frame_ms / 10000.0)
        self.attack_frames = _ceil_div(attack_ms, frame_ms)
        self.hangover_frames = _ceil_div(hangover_ms, frame_ms)
        self.hold_frames = _ceil_div(echo_hold_ms, frame_ms)
        self.window_frames = _ceil_div(WINDOW_MS, frame_ms)
        self.gap_frames = _ceil_div(SPREAD_GAP_MS, frame_ms)
        self.reset()

    def reset(self) -> None:
        self.state = QUIET
        self.count = 0
        self.floor = -1.0  # unset
        self.energy = -1.0  # no frame yet
        self.threshold = -1.0
        self.spread = SPREAD_INIT
        self.inactive = 0  # consecutive inactive frames, saturating at gap_frames + 1
        self.window = [0.0] * WINDOW_COUNT
        self.window_index = 0
        self.window_min = math.inf
        self.window_count = 0
        self.agent = 0.0
        self.frame_no = 0
        self.steps: list[tuple[float, int]] = []  # (level, last frame held): later ends quieter

    # -- energy ------------------------------------------------------------

    def frame_energies(self, pcm: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Energy of every whole frame of ``pcm`` (int16 samples), vectorised."""
        x = np.asarray(pcm, dtype=np.int16).astype(np.int64)
        n = len(x) // self.frame_samples
        xb = x[: n * self.frame_samples].reshape(n, self.blocks, self.block)
        t = 2 * np.arange(self.block, dtype=np.int64) - (self.block - 1)
        s1 = xb.sum(axis=2)
        st = (xb * t).sum(axis=2)
        s2 = (xb * xb).sum(axis=2)
        r = self.block * self.t_sq * s2 - self.t_sq * s1 * s1 - self.block * st * st
        if n == 0:
            return np.zeros(0)
        acc = np.cumsum(r.astype(np.float64), axis=1)[:, -1]
        return acc * self.norm

    # -- per frame ---------------------------------------------------------

    def step(self, e: float) -> bool:
        """Advance one frame whose energy is ``e``; return ``speaking``."""
        self.energy = e
        margin = 1.0 + SPREAD_GAIN * self.spread
        if margin < self.margin:
            margin = self.margin
        if margin > self.margin_cap:
            margin = self.margin_cap
        if self.floor < 0.0 and e >= self.min_e:
            self.floor = e
        used = self.floor
        thr = used * margin
        if thr < self.min_e:
            thr = self.min_e
        echo = self.agent * self.echo_loss
        if thr < echo:
            thr = echo
        self.threshold = thr
        active = e > thr

        state = self.state
        if active:
            if state == SPEAKING or state == STOPPING:
                state = SPEAKING
            elif state == STARTING:
                self.count += 1
                if self.count > self.attack_frames:
                    state = SPEAKING
            elif self.attack_frames == 0:
                state = SPEAKING
            else:
                state = STARTING
                self.count = 1
        elif state == SPEAKING:
            if self.hangover_frames == 0:
                state = QUIET
            else:
                state = STOPPING
                self.count = 1
        elif state == STOPPING:
            self.count += 1
            if self.count > self.hangover_frames:
                state = QUIET
        elif state == STARTING:
            state = QUIET
        self.state = state

        floor = self.floor
        if floor >= 0.0:
            if e < floor:
                floor = floor + self.fall * (e - floor)
            elif e <= floor * margin:
                floor = floor + self.track * (e - floor)
            else:
                floor = floor * self.rise
            if floor < FLOOR_MIN:
                floor = FLOOR_MIN

        if e < self.window_min:
            self.window_min = e
        self.window_count += 1
        if self.window_count == self.window_frames:
            self.window[self.window_index] = self.window_min
            self.window_index = (self.window_index + 1) % WINDOW_COUNT
            self.window_min = math.inf
            self.window_count = 0
            lowest = min(self.window)
            if floor >= 0.0 and floor < lowest:
                floor = lowest
        self.floor = floor

        if active:
            self.inactive = 0
        elif self.inactive <= self.gap_frames:
            self.inactive += 1
        if used > 0.0 and self.inactive > self.gap_frames:
            x = e / used
            if x <= margin:
                self.spread = self.spread + self.spread_coef * (abs(x - 1.0) - self.spread)

        self.frame_no += 1
        self.steps = [(level, until) for level, until in self.steps if until >= self.frame_no]
        held = self.steps[0][0] if self.steps else 0.0
        if self.agent > held:  # past its hold: decays, down to the next level still held
            self.agent = self.agent * self.release
            if self.agent < ECHO_ENV_MIN:
                self.agent = 0.0
            self.agent = max(self.agent, held)
        return state >= SPEAKING

    def process(self, frame: npt.ArrayLike) -> bool:
        return self.step(float(self.frame_energies(frame)[0]))

    def run(self, pcm: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """``process`` every whole frame of ``pcm``; the decisions as an array."""
        return np.array([self.step(float(e)) for e in self.frame_energies(pcm)], dtype=bool)

    def observe_agent(self, pcm: npt.ArrayLike) -> None:
        energies = self.frame_energies(pcm)
        self._raise_agent(float(energies.max()), len(energies))  # (held for the whole of a long chunk)

    def observe_agent_level(self, dbfs: float) -> None:
        self._raise_agent(10.0 ** (dbfs / 10.0), 1)

    def _raise_agent(self, e: float, frames: int) -> None:
        """Each observation is held for its own time (a staircase of levels; see the kernel's ``_raise_agent``)."""
        until = self.frame_no + self.hold_frames + frames - 1
        self.agent = max(self.agent, e)
        if e <= 0.0 or any(level >= e and end >= until for level, end in self.steps):
            return
        steps = [(level, end) for level, end in self.steps if not (level <= e and end <= until)]
        steps.append((e, until))
        steps.sort(key=lambda step: step[1])
        if len(steps) > ECHO_STEPS:  # the last two merge: the louder level, to the later end
            steps[-2:] = [(steps[-2][0], steps[-1][1])]
        self.steps = steps

    # -- read-outs ---------------------------------------------------------

    @property
    def speaking(self) -> bool:
        return self.state >= SPEAKING


def dbfs(e: float) -> float | None:
    """The kernel's convention for the ``*_dbfs`` properties."""
    if e < 0.0:
        return None
    return 10.0 * math.log10(e) if e > 0.0 else -math.inf
