"""What the routes find on the app's state, and who may change what is served.

As vLLM's own routes find their handlers on ``request.app.state`` (``openai_serving_models`` and so
on), ours find the objects the endpoint plugin's start-up built under the keys below. A route that
changes what is served names its `action`: it then needs the admin token (`AdminAccess`, see `auth`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ..auth import AdminGuard
from ..hotswap import HotSwapError

# app.state keys (init_state fills them; a missing one means "not available on this server": 503).
STATE_KEY = "vllm_surgery_hotswapper"  # HotSwapper
REFINER_KEY = "vllm_surgery_refiner"  # refinements.RefineRoute
JOBS_KEY = "vllm_surgery_jobs"  # the job database (storage.Database)
TRAFFIC_KEY = "vllm_surgery_traffic"  # traffic.TrafficRecorder
CANARY_KEY = "vllm_surgery_canaries"  # canaries.CanaryController
ACCESS_KEY = "vllm_surgery_access"  # AdminAccess (set by attach_router)

NO_ENGINE = "hot-swap is not available on this server (no LoRA engine)"


class AdminAccess:
    """The admin guard, and the settings error that refuses every mutation while the settings are
    broken (the server then does not start, but the routes exist from attach_router on)."""

    def __init__(self, guard: AdminGuard, settings_error: Exception | None = None) -> None:
        self.guard = guard
        self.settings_error = settings_error

    def refusal(self, request: Request, action: str) -> str | None:
        """None if `request` may perform `action`, else the reason (answered with 403)."""
        reason = self.guard.refusal(request, action)
        if self.settings_error is not None:
            reason = f"{action} is refused: the server's settings are broken ({self.settings_error})"
        return reason


def state_object(request: Request, key: str, action: str | None = None, unavailable: str = NO_ENGINE) -> Any:
    """The object the start-up stored under `key`. `action` names a mutating route, which needs the
    admin token. Raises HotSwapError: 403 (refused), 503 (`unavailable`: nothing under `key`)."""
    if action is not None:
        access: AdminAccess | None = getattr(request.app.state, ACCESS_KEY, None)
        reason = access.refusal(request, action) if access is not None else f"{action} is not available"
        if reason is not None:
            raise HotSwapError(reason, 403, "Forbidden")
    target = getattr(request.app.state, key, None)
    if target is None:
        raise HotSwapError(unavailable, 503, "ServiceUnavailable")
    return target


def hotswapper(request: Request, action: str | None = None) -> Any:
    """The server's HotSwapper (see `state_object`)."""
    return state_object(request, STATE_KEY, action)
