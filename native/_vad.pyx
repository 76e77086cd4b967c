# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Energy voice activity detector with an adaptive noise floor, hysteresis and echo guard.

One call per frame: ``EnergyVAD.process(frame) -> bool``.  The algorithm, and
the order of its steps, is specified in ``mediaserver/codec/_reference/vad.py``;
this kernel reaches the same decision and the same state on every frame
(integer energies, then the same IEEE double operations in the same order).

Per frame the work is two small ``noexcept nogil`` C functions: the frame
energy (integer sums over 2.5 ms blocks) and one step of the state machine.
``process`` touches no Python object besides its argument and allocates
nothing; it keeps the GIL, since a 20 ms frame costs less than releasing it.
"""

cimport cython
from cpython.buffer cimport PyBuffer_Release

from audiobuf cimport get_audio_buffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.math cimport INFINITY, fabs, log10
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t

from common cimport bind_args, load_le16

import math
import numbers
import operator

# Constants of the algorithm; see mediaserver/codec/_reference/vad.py, which
# must use the same values.
SAMPLE_RATES_HZ = (8000, 16000, 24000, 32000, 48000)
cdef int BLOCK_DIVISOR = 400          # block = 2.5 ms: the detrending high-pass
FLOOR_FALL_MS = 20.0                  # time constant towards frames below the floor
FLOOR_TRACK_MS = 400.0                # time constant towards frames within the margin
FLOOR_RISE_DB_PER_S = 4.0             # rise under speech-like frames
cdef double FLOOR_MIN = 1e-10         # -100 dBFS
WINDOW_MS = 500                       # minimum-statistics sub-window
SPREAD_MS = 1000.0                    # time constant of the noise spread estimate
cdef double SPREAD_GAIN = 8.0         # margin >= 1 + SPREAD_GAIN * spread (in power)
cdef double SPREAD_INIT = 0.3         # a fresh detector starts with a 5.3 dB margin
MARGIN_CAP_DB = 10.0                  # the spread never asks for more than this
SPREAD_GAP_MS = 200                   # it learns only this long after the last active frame
ECHO_RELEASE_DB_PER_S = 150.0         # agent envelope decay after its hold
cdef double ECHO_ENV_MIN = 1e-12      # -120 dBFS: below, the envelope is 0

cdef enum:
    WINDOW_COUNT = 4                  # sub-windows: floor >= minimum of the last 2 s
    ECHO_STEPS = 16                   # agent levels held at once (see _raise_agent)
    MAX_BLOCK = 120                   # 2.5 ms at 48 kHz

cdef enum VadState:
    QUIET = 0
    STARTING = 1
    SPEAKING = 2
    STOPPING = 3

MAX_MS = 60_000                       # bound for attack, hangover and echo hold


ctypedef struct Config:
    Py_ssize_t frame_samples
    Py_ssize_t frame_bytes
    Py_ssize_t block
    Py_ssize_t blocks
    int64_t t_sq                      # sum over a block of (2i - (block - 1))^2
    int64_t block_t_sq                # block * t_sq
    int16_t weight[MAX_BLOCK]         # 2i - (block - 1): the centred time index
    double norm                       # energy scale: full-scale square wave = 1
    double margin                     # the minimum margin
    double margin_cap
    double spread_coef
    double min_e
    double echo_loss
    double fall
    double track
    double rise
    double release
    int attack_frames
    int hangover_frames
    int hold_frames
    int window_frames
    int gap_frames


ctypedef struct State:
    int state
    int count
    double floor                      # < 0: unset
    double energy                     # last frame; < 0: none yet
    double threshold                  # last frame's; < 0: none yet
    double spread                     # mean |e / floor - 1| over quiet frames
    int inactive                      # consecutive inactive frames, saturating
    double window[WINDOW_COUNT]
    int window_index
    double window_min
    int window_count
    double agent                      # agent envelope (energy)
    int64_t frame_no                  # frames stepped so far
    # The agent levels still held, as a staircase: the last frame each is held
    # to, earliest first, and its level, loudest first (see _raise_agent).
    int steps
    double step_level[ECHO_STEPS + 1]
    int64_t step_until[ECHO_STEPS + 1]


cdef double _frame_energy(const uint8_t* p, const Config* c) noexcept nogil:
    """Mean power after removing each block's least-squares line; 1.0 = 0 dBFS.

    Per block, r = B*T*sum(x^2) - T*sum(x)^2 - B*sum(t*x)^2 is B*T times the
    residual energy (t = 2i - (B - 1) is orthogonal to 1).  It is exact in
    int64 for blocks up to 120 samples (48 kHz); the blocks' values are summed
    in double, in order.
    """
    cdef double acc = 0.0
    cdef Py_ssize_t b, i
    cdef Py_ssize_t block = c.block
    cdef int16_t x
    cdef int32_t s1, st
    cdef uint64_t s2
    cdef int64_t r
    for b in range(c.blocks):
        s1 = 0
        st = 0
        s2 = 0
        for i in range(block):
            x = load_le16(p + 2 * i)
            s1 += x
            st += <int32_t>c.weight[i] * x
            s2 += <uint32_t>(<int32_t>x * x)
        r = c.block_t_sq * <int64_t>s2 - c.t_sq * (<int64_t>s1 * s1) - block * (<int64_t>st * st)
        acc += <double>r
        p += 2 * block
    return acc * c.norm


cdef bint _step(State* s, const Config* c, double e) noexcept nogil:
    """One frame of the detector; returns ``speaking``.  Mirrors the reference's ``step``."""
    cdef double margin, used, thr, echo, floor, lowest, x, held
    cdef int state, k
    cdef bint active
    s.energy = e
    margin = 1.0 + SPREAD_GAIN * s.spread
    if margin < c.margin:
        margin = c.margin
    if margin > c.margin_cap:
        margin = c.margin_cap
    if s.floor < 0.0 and e >= c.min_e:
        s.floor = e
    used = s.floor
    thr = used * margin
    if thr < c.min_e:
        thr = c.min_e
    echo = s.agent * c.echo_loss
    if thr < echo:
        thr = echo
    s.threshold = thr

    state = s.state
    active = e > thr
    if active:
        if state == SPEAKING or state == STOPPING:
            state = SPEAKING
        elif state == STARTING:
            s.count += 1
            if s.count > c.attack_frames:
                state = SPEAKING
        elif c.attack_frames == 0:
            state = SPEAKING
        else:
            state = STARTING
            s.count = 1
    elif state == SPEAKING:
        if c.hangover_frames == 0:
            state = QUIET
        else:
            state = STOPPING
            s.count = 1
    elif state == STOPPING:
        s.count += 1
        if s.count > c.hangover_frames:
            state = QUIET
    elif state == STARTING:
        state = QUIET
    s.state = state

    floor = s.floor
    if floor >= 0.0:
        if e < floor:
            floor = floor + c.fall * (e - floor)
        elif e <= floor * margin:
            floor = floor + c.track * (e - floor)
        else:
            floor = floor * c.rise
        if floor < FLOOR_MIN:
            floor = FLOOR_MIN

    if e < s.window_min:
        s.window_min = e
    s.window_count += 1
    if s.window_count == c.window_frames:
        s.window[s.window_index] = s.window_min
        s.window_index = (s.window_index + 1) % WINDOW_COUNT
        s.window_min = INFINITY
        s.window_count = 0
        lowest = s.window[0]
        for k in range(1, WINDOW_COUNT):
            if s.window[k] < lowest:
                lowest = s.window[k]
        if floor >= 0.0 and floor < lowest:
            floor = lowest
    s.floor = floor

    if active:
        s.inactive = 0
    elif s.inactive <= c.gap_frames:
        s.inactive += 1
    if used > 0.0 and s.inactive > c.gap_frames:
        x = e / used
        if x <= margin:
            s.spread = s.spread + c.spread_coef * (fabs(x - 1.0) - s.spread)

    s.frame_no += 1
    k = 0
    while k < s.steps and s.step_until[k] < s.frame_no:
        k += 1
    if k:
        _drop_steps(s, k)
    held = s.step_level[0] if s.steps else 0.0
    if s.agent > held:  # past its hold: the envelope decays, down to the next level still held
        s.agent = s.agent * c.release
        if s.agent < ECHO_ENV_MIN:
            s.agent = 0.0
        if s.agent < held:
            s.agent = held
    return state >= SPEAKING


cdef double _loudest(const uint8_t* p, Py_ssize_t frames, const Config* c) noexcept nogil:
    cdef double e, loudest = 0.0
    cdef Py_ssize_t i
    for i in range(frames):
        e = _frame_energy(p + i * c.frame_bytes, c)
        if e > loudest:
            loudest = e
    return loudest


cdef void _drop_steps(State* s, int k) noexcept nogil:
    cdef int i
    for i in range(k, s.steps):
        s.step_level[i - k] = s.step_level[i]
        s.step_until[i - k] = s.step_until[i]
    s.steps -= k


cdef void _raise_agent(State* s, double e, int64_t frames, int hold_frames) noexcept nogil:
    """Agent audio at level ``e`` for ``frames`` frames: held for them and ``hold_frames`` more.

    Every observation is held for its own time: a short loud one does not
    cut a long quieter one's hold short, and a quieter one still counts once
    a louder one's hold ends.  The levels held form a staircase (each later
    end quieter); beyond ECHO_STEPS of them the last two merge into the
    louder level held to the later end (more guard, never less).
    """
    cdef int64_t until = s.frame_no + hold_frames + frames - 1
    cdef int i, j, at
    if e > s.agent:
        s.agent = e
    if e <= 0.0:
        return
    for i in range(s.steps):
        if s.step_level[i] >= e and s.step_until[i] >= until:
            return  # held already, as loud and as long
    j = 0
    for i in range(s.steps):  # drop what this one holds as loud and as long
        if not (s.step_level[i] <= e and s.step_until[i] <= until):
            s.step_level[j] = s.step_level[i]
            s.step_until[j] = s.step_until[i]
            j += 1
    s.steps = j
    at = 0
    while at < s.steps and s.step_until[at] < until:
        at += 1
    i = s.steps
    while i > at:
        s.step_level[i] = s.step_level[i - 1]
        s.step_until[i] = s.step_until[i - 1]
        i -= 1
    s.step_level[at] = e
    s.step_until[at] = until
    s.steps += 1
    if s.steps > ECHO_STEPS:
        s.step_until[s.steps - 2] = s.step_until[s.steps - 1]
        s.steps -= 1


cdef inline object _dbfs(double e):
    if e < 0.0:
        return None
    if e == 0.0:
        return -math.inf
    return 10.0 * log10(e)


def _number(name, value):
    """``value`` as a float: a real number (not a bool or a string); a huge int is out of range (ValueError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _int(name, value, unit):
    """``value`` as an int (not a bool, a float or a string): a TypeError that names the setting otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int of {unit}, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int of {unit}, got {type(value).__name__}") from None


def _ms(name, value):
    v = _int(name, value, "ms")
    if not 0 <= v <= MAX_MS:
        raise ValueError(f"{name} must be between 0 and {MAX_MS} ms, got {v}")
    return v


def _db(name, value, low, high):
    v = _number(name, value)
    if not (math.isfinite(v) and low <= v <= high):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{name} must be a finite number from {low:g} to {high:g} dB, got {shown}")
    return v


def _ceil_div(a, b):
    return -(-a // b)


def _bind(sample_rate=8000, frame_ms=20, *, attack_ms=0, hangover_ms=160, margin_db=4.0, min_level_dbfs=-55.0,
          echo_return_loss_db=20.0, echo_hold_ms=400):
    return sample_rate, frame_ms, attack_ms, hangover_ms, margin_db, min_level_dbfs, echo_return_loss_db, echo_hold_ms


@cython.auto_pickle(False)
@cython.final
cdef class EnergyVAD:
    """EnergyVAD(sample_rate=8000, frame_ms=20, *, attack_ms=0, hangover_ms=160, margin_db=4.0, min_level_dbfs=-55.0, echo_return_loss_db=20.0, echo_hold_ms=400)
--

    Energy voice activity detector for PCM16 frames (signed 16-bit little-endian, mono).

    * A frame is *active* when its level (after a 350 Hz high-pass) exceeds
      the noise floor by ``margin_db`` (more in noise whose level swings, up
      to 10 dB), exceeds ``min_level_dbfs``, and exceeds the agent's recent
      level minus ``echo_return_loss_db``.
    * ``speaking`` turns True after ``attack_ms`` of consecutive active frames
      (0: on the first one) and turns False after ``hangover_ms`` of inactive
      frames; both are rounded up to whole frames.
    * The noise floor adapts by itself: fast down, slowly up under speech,
      never below the quietest frame of the last 2 s.  It is unset until a
      frame reaches ``min_level_dbfs``, and that frame sets it (a line's room
      tone): a steady tone that starts loud after digital silence is taken as
      noise, never as speech.
    * Echo guard: call ``observe_agent(pcm)`` with each chunk of agent audio as
      it is sent to the caller (or ``observe_agent_level(dbfs)``).  For that
      audio's duration plus ``echo_hold_ms``, quieter input is not speech.

    Levels are in dBFS relative to a full-scale square wave (a full-scale sine
    is -3 dBFS).  No clock is read: time advances by one frame per ``process``.
    """

    cdef Config c
    cdef State s
    cdef readonly int sample_rate
    cdef readonly int frame_ms

    def __cinit__(self):
        # (made with __new__, __init__ not called: the read-outs say "none yet", as after a reset)
        self.s.floor = -1.0
        self.s.energy = -1.0
        self.s.threshold = -1.0

    def __init__(self, *args, **kwargs):
        sample_rate, frame_ms, attack_ms, hangover_ms, margin_db, min_level_dbfs, echo_return_loss_db, echo_hold_ms = (
            bind_args(_bind, "EnergyVAD", args, kwargs))
        if self.c.frame_bytes != 0:  # (what a running observe_agent reads without the GIL must not change under it)
            raise TypeError("an EnergyVAD is set up when made: make a new one for other settings")
        rate = _int("sample_rate", sample_rate, "Hz")
        if rate not in SAMPLE_RATES_HZ:
            raise ValueError(f"sample_rate must be one of {', '.join(map(str, SAMPLE_RATES_HZ))} Hz, got {rate}")
        fms = _int("frame_ms", frame_ms, "ms")
        if not (5 <= fms <= 100 and fms % 5 == 0):
            raise ValueError(f"frame_ms must be a multiple of 5 from 5 to 100, got {fms}")
        attack = _ms("attack_ms", attack_ms)
        hangover = _ms("hangover_ms", hangover_ms)
        hold = _ms("echo_hold_ms", echo_hold_ms)
        margin = _db("margin_db", margin_db, 0.5, 40.0)
        min_level = _db("min_level_dbfs", min_level_dbfs, -100.0, 0.0)
        erl = _db("echo_return_loss_db", echo_return_loss_db, 0.0, 100.0)

        # The derived constants, by the reference's formulas, in Python floats.
        n = rate * fms // 1000
        block = rate // BLOCK_DIVISOR
        t_sq = block * (block * block - 1) // 3
        self.c.frame_samples = n
        self.c.frame_bytes = 2 * n
        self.c.block = block
        self.c.blocks = n // block
        self.c.t_sq = t_sq
        self.c.block_t_sq = block * t_sq
        for i in range(block):
            self.c.weight[i] = 2 * i - (block - 1)
        self.c.norm = 1.0 / (block * t_sq * n * (1 << 30))
        self.c.margin = 10.0 ** (margin / 10.0)
        self.c.margin_cap = max(10.0 ** (MARGIN_CAP_DB / 10.0), self.c.margin)
        self.c.spread_coef = 1.0 - math.exp(-fms / SPREAD_MS)
        self.c.min_e = 10.0 ** (min_level / 10.0)
        self.c.echo_loss = 10.0 ** (-erl / 10.0)
        self.c.fall = 1.0 - math.exp(-fms / FLOOR_FALL_MS)
        self.c.track = 1.0 - math.exp(-fms / FLOOR_TRACK_MS)
        self.c.rise = 10.0 ** (FLOOR_RISE_DB_PER_S * fms / 10000.0)
        self.c.release = 10.0 ** (-ECHO_RELEASE_DB_PER_S * fms / 10000.0)
        self.c.attack_frames = _ceil_div(attack, fms)
        self.c.hangover_frames = _ceil_div(hangover, fms)
        self.c.hold_frames = _ceil_div(hold, fms)
        self.c.window_frames = _ceil_div(WINDOW_MS, fms)
        self.c.gap_frames = _ceil_div(SPREAD_GAP_MS, fms)
        self.sample_rate = rate
        self.frame_ms = fms
        self.reset()

    def reset(self):
        """Forget everything heard and observed: back to the state after construction."""
        cdef int k
        self.s.state = QUIET
        self.s.count = 0
        self.s.floor = -1.0
        self.s.energy = -1.0
        self.s.threshold = -1.0
        self.s.spread = SPREAD_INIT
        self.s.inactive = 0
        for k in range(WINDOW_COUNT):
            self.s.window[k] = 0.0
        self.s.window_index = 0
        self.s.window_min = INFINITY
        self.s.window_count = 0
        self.s.agent = 0.0
        self.s.frame_no = 0
        self.s.steps = 0

    def process(self, frame, /):
        """Take one frame (``frame_bytes`` of PCM16 in any buffer); return ``speaking``."""
        cdef Py_buffer view
        cdef double e
        if self.c.frame_bytes == 0:
            self._not_initialised()
        if PyBytes_CheckExact(frame):
            if PyBytes_GET_SIZE(frame) != self.c.frame_bytes:
                self._wrong_length(PyBytes_GET_SIZE(frame))
            e = _frame_energy(<const uint8_t*>PyBytes_AS_STRING(frame), &self.c)
        else:
            get_audio_buffer(frame, &view, 2, "frame")
            try:
                if view.len != self.c.frame_bytes:
                    self._wrong_length(view.len)
                e = _frame_energy(<const uint8_t*>view.buf, &self.c)
            finally:
                PyBuffer_Release(&view)
        return _step(&self.s, &self.c, e)

    cdef int _not_initialised(self) except -1:
        raise RuntimeError("EnergyVAD.__init__ was not called (made with EnergyVAD.__new__?)")

    cdef int _wrong_length(self, Py_ssize_t got) except -1:
        raise ValueError(
            f"frame must be {self.c.frame_bytes} bytes ({self.c.frame_samples} PCM16 samples, "
            f"{self.frame_ms} ms at {self.sample_rate} Hz), got {got} bytes"
        )

    def observe_agent(self, pcm, /):
        """Note agent audio being sent now: a whole number of frames of PCM16, at this rate.

        Its loudest frame raises the echo threshold for the audio's duration
        plus ``echo_hold_ms``.
        """
        cdef Py_buffer view
        cdef Py_ssize_t frames
        cdef double loudest = 0.0
        if self.c.frame_bytes == 0:
            self._not_initialised()
        get_audio_buffer(pcm, &view, 2, "agent audio")
        try:
            frames = view.len // self.c.frame_bytes
            if frames == 0 or view.len % self.c.frame_bytes:
                raise ValueError(
                    f"agent audio must be a whole number of {self.c.frame_bytes}-byte frames "
                    f"({self.frame_ms} ms of PCM16 at {self.sample_rate} Hz), got {view.len} bytes"
                )
            if frames < 64:
                loudest = _loudest(<const uint8_t*>view.buf, frames, &self.c)
            else:  # a long reply at once: the GIL is released for it
                with nogil:
                    loudest = _loudest(<const uint8_t*>view.buf, frames, &self.c)
        finally:
            PyBuffer_Release(&view)
        _raise_agent(&self.s, loudest, frames, self.c.hold_frames)

    def observe_agent_level(self, dbfs, /):
        """Like ``observe_agent``, for one frame of agent audio whose level is ``dbfs``."""
        if self.c.frame_bytes == 0:
            self._not_initialised()
        v = _number("dbfs", dbfs)
        if math.isnan(v) or v > 20.0:
            raise ValueError(f"dbfs must be a level of at most 20 dBFS (or -inf), got {dbfs!r}")
        _raise_agent(&self.s, 10.0 ** (v / 10.0), 1, self.c.hold_frames)

    def __repr__(self):
        if self.c.frame_bytes == 0:
            return "EnergyVAD(<not set up: made without __init__>)"
        floor = _dbfs(self.s.floor)
        return (f"EnergyVAD(sample_rate={self.sample_rate}, frame_ms={self.frame_ms}, "
                f"attack_frames={self.c.attack_frames}, hangover_frames={self.c.hangover_frames}, "
                f"speaking={self.s.state >= SPEAKING}, noise_floor_dbfs={'None' if floor is None else f'{floor:.1f}'})")

    @property
    def speaking(self):
        """True while speech is detected, after attack and hangover."""
        return self.s.state >= SPEAKING

    @property
    def level_dbfs(self):
        """Level of the last frame (after the high-pass); None before the first, -inf for silence."""
        return _dbfs(self.s.energy)

    @property
    def noise_floor_dbfs(self):
        """The noise floor estimate; None until a frame reaches ``min_level_dbfs``."""
        return _dbfs(self.s.floor)

    @property
    def threshold_dbfs(self):
        """The threshold the last frame was compared with (floor, minimum or echo); None before the first."""
        return _dbfs(self.s.threshold)

    @property
    def agent_level_dbfs(self):
        """The held agent level that sets the echo threshold; -inf when none."""
        return _dbfs(self.s.agent)

    @property
    def frame_samples(self):
        """Samples in each frame ``process`` takes (``sample_rate * frame_ms / 1000``)."""
        return self.c.frame_samples

    @property
    def frame_bytes(self):
        """Bytes in each frame ``process`` takes: two per sample."""
        return self.c.frame_bytes

    @property
    def attack_frames(self):
        """Active frames reported as not speaking before ``speaking`` turns True."""
        return self.c.attack_frames

    @property
    def hangover_frames(self):
        """Inactive frames still reported as speaking before ``speaking`` turns False."""
        return self.c.hangover_frames
