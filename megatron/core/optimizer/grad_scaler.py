"""Loss scalers for fp16 training: a constant scale, or a dynamic one that backs off on overflow."""

from abc import ABC, abstractmethod


class MegatronGradScaler(ABC):
    """Multiplies the loss before backward so fp16 gradients do not underflow."""

    def __init__(self, initial_scale: float):
        if initial_scale <= 0.0:
            raise ValueError(f"loss scale must be positive, got {initial_scale}")
        self._scale = float(initial_scale)

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def inv_scale(self) -> float:
        return 1.0 / self._scale

    @abstractmethod
    def update(self, found_inf: bool) -> None:
        """React to whether this step's gradients overflowed."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What a checkpoint must hold to continue the scale exactly."""

    @abstractmethod
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore `state_dict()`."""


class ConstantGradScaler(MegatronGradScaler):
    """A fixed scale (--loss-scale)."""

    def update(self, found_inf: bool) -> None:
        """The scale never changes."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore: the scale comes from the flags."""


class DynamicGradScaler(MegatronGradScaler):
    """Halves the scale after `hysteresis` overflowing steps and doubles it after `growth_interval` clean ones.

    A step with an overflow is skipped by the optimizer; the scale never drops below `min_scale`.
    """

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
    ):
        super().__init__(initial_scale)
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError("min_scale must be positive and not above initial_scale")
        if growth_factor <= 1.0 or not 0.0 < backoff_factor < 1.0:
            raise ValueError("growth_factor must exceed 1 and backoff_factor lie in (0, 1)")
        if growth_interval <= 0 or hysteresis <= 0:
            raise ValueError("growth_interval and hysteresis must be positive")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self._scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._scale = float(state_dict["scale"])
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])
