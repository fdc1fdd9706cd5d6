"""Which requests are recorded (per-adapter policy and sampling) and how long their records are kept
(records, bytes and age)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..settings import ServingSettings
from ..storage import Retention

DAY_S = 86400.0


@dataclass(frozen=True)
class AdapterPolicy:
    """The effective traffic settings of one adapter (per-adapter entry over the global values)."""

    sample_rate: float
    retention: Retention
    include_unrated: bool
    calibration_files: tuple[str, ...]


class TrafficPolicy:
    """Which adapters are recorded, at what rate, and how long their records are kept."""

    def __init__(self, settings: ServingSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self._cache: dict[str, AdapterPolicy] = {}

    @property
    def enabled(self) -> bool:
        """Whether anything at all can be recorded (the middleware is installed only then)."""
        return self.settings.records_traffic

    def for_adapter(self, name: str) -> AdapterPolicy:
        policy = self._cache.get(name)
        if policy is None:
            s = self.settings
            entry = s.adapter_traffic(name)
            if entry is None:
                rate = s.traffic_sample_rate if s.traffic else 0.0
            elif not entry.capture:
                rate = 0.0
            else:
                rate = entry.sample_rate if entry.sample_rate is not None else s.traffic_sample_rate
            days = entry.max_age_days if entry and entry.max_age_days is not None else s.traffic_max_age_days
            records = entry.max_records if entry and entry.max_records is not None else s.traffic_max_records
            max_bytes = entry.max_bytes if entry and entry.max_bytes is not None else s.traffic_max_bytes
            policy = AdapterPolicy(
                sample_rate=rate,
                retention=Retention(
                    max_records=records, max_age_s=days * DAY_S if days > 0 else None, max_bytes=max_bytes
                ),
                include_unrated=bool(entry and entry.include_unrated),
                calibration_files=entry.calibration_files if entry else (),
            )
            if len(self._cache) > 4096:  # names come from requests: keep the cache bounded
                self._cache.clear()
            self._cache[name] = policy
        return policy

    def sample(self, name: str) -> bool:
        """Whether this request for adapter `name` is recorded (cheap: called on the event loop)."""
        rate = self.for_adapter(name).sample_rate
        return rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)
