from mediaserver._native._buffer import _Buffer
from typing import Final, final

SAMPLE_RATES_HZ: Final[tuple[int, ...]]
FLOOR_FALL_MS: Final[float]
FLOOR_TRACK_MS: Final[float]
FLOOR_RISE_DB_PER_S: Final[float]
WINDOW_MS: Final[int]
SPREAD_MS: Final[float]
MARGIN_CAP_DB: Final[float]
SPREAD_GAP_MS: Final[int]
ECHO_RELEASE_DB_PER_S: Final[float]
MAX_MS: Final[int]

@final
class EnergyVAD:
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
    ) -> None: ...
    def process(self, frame: _Buffer, /) -> bool: ...
    def observe_agent(self, pcm: _Buffer, /) -> None: ...
    def observe_agent_level(self, dbfs: float, /) -> None: ...
    def reset(self) -> None: ...
    @property
    def sample_rate(self) -> int: ...
    @property
    def frame_ms(self) -> int: ...
    @property
    def frame_samples(self) -> int: ...
    @property
    def frame_bytes(self) -> int: ...
    @property
    def attack_frames(self) -> int: ...
    @property
    def hangover_frames(self) -> int: ...
    @property
    def speaking(self) -> bool: ...
    @property
    def level_dbfs(self) -> float | None: ...
    @property
    def noise_floor_dbfs(self) -> float | None: ...
    @property
    def threshold_dbfs(self) -> float | None: ...
    @property
    def agent_level_dbfs(self) -> float: ...
