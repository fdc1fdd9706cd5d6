"""Who may change what is served (the admin token), and whose feedback counts as calibration data
(`FeedbackTrust`: the reviewer token; see docs/security.md).

Every route that changes which weights answer under a name (swap, rollback, refine, and vLLM's
runtime load/unload routes, which the plugin replaces) needs the admin token (`admin_token`,
``VLLM_SURGERY_ADMIN_TOKEN``), sent as ``X-Surgery-Admin-Token: <token>`` beside the API key or as
``Authorization: Bearer <token>`` alone (the token is then also accepted by vLLM's --api-key guard).
The inference API key alone never suffices. With no admin token configured these routes are refused
(403 naming the setting), unless the operator opts in explicitly with
``VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN`` (trusted development servers); the start-up log warns in
both cases.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from fastapi import Request

from ..settings import ServingSettings, env_of

log = logging.getLogger(f"vllm.{__name__}")

ADMIN_HEADER = "X-Surgery-Admin-Token"
TOKEN_ENV = env_of("admin_token")
ALLOW_ENV = env_of("allow_unauthenticated_admin")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class AdminGuard:
    """Decides whether a request may change what is served."""

    def __init__(self, settings: ServingSettings) -> None:
        self.token = settings.admin_token
        self.allow_unauthenticated = settings.allow_unauthenticated_admin
        self._digest = _digest(self.token) if self.token else None

    def log_startup(self) -> None:
        """One line saying how mutating routes are protected (a warning unless a token is set)."""
        if self._digest is not None:
            if self.allow_unauthenticated:
                log.warning("%s is ignored: an admin token is configured and required", ALLOW_ENV)
            log.info("vllm-surgery: routes that change what is served need the admin token")
        elif self.allow_unauthenticated:
            log.warning(
                "vllm-surgery: %s is on and no admin token is set: anyone who passes vLLM's --api-key "
                "guard (anyone at all without --api-key) can change which adapter weights are served",
                ALLOW_ENV,
            )
        else:
            log.warning(
                "vllm-surgery: no admin token (%s): swap, rollback, refine and adapter load/unload are "
                "refused with 403 until one is set",
                TOKEN_ENV,
            )

    def refusal(self, request: Request, action: str) -> str | None:
        """None if `request` may perform `action`, else the reason (answered with 403)."""
        if self._digest is None:
            if self.allow_unauthenticated:
                return None
            return (
                f"{action} changes what is served and is switched off on this server: no admin token is "
                f"configured (set {TOKEN_ENV}, or {ALLOW_ENV}=1 on a trusted development server)"
            )
        candidates = [request.headers.get(ADMIN_HEADER, "")]
        scheme, _, param = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(param)
        ok = False
        for c in candidates:  # no early exit: the time taken does not tell which candidate matched
            ok |= bool(c) and secrets.compare_digest(_digest(c), self._digest)
        if ok:
            return None
        return f"{action} needs the admin token ({ADMIN_HEADER} header, or Authorization: Bearer)"


# ----------------------------------------------------------------------------- feedback trust
REVIEWER_HEADER = "X-Surgery-Reviewer-Token"
TRUST_ENV = env_of("feedback_trust")
REVIEWER_ENV = env_of("reviewer_token")


class FeedbackTrust:
    """Whose feedback counts as calibration data, and who sent it (docs/security.md).

    Feedback steers the weights that are served once automatic refinement is on: a correction becomes
    a calibration example, and enough of them queue a job whose accepted result is swapped in. The
    gate measures on the same feedback, so it cannot catch poisoned corrections. So with
    ``feedback_trust = "reviewer"`` (the default) only feedback sent with the reviewer token
    (``X-Surgery-Reviewer-Token``) or the admin token counts; with ``"api-key"`` every client that
    passes vLLM's --api-key guard does (the behaviour before this setting existed). Other feedback is
    stored and counted, marked untrusted, and never used."""

    def __init__(self, settings: ServingSettings, admin: AdminGuard | None = None) -> None:
        self.mode = settings.feedback_trust
        self.admin = admin if admin is not None else AdminGuard(settings)
        self._reviewer = _digest(settings.reviewer_token) if settings.reviewer_token else None

    def log_startup(self, auto_refine: bool) -> None:
        """One line saying whose feedback counts (a warning where anyone's does, or no one's can)."""
        if self.mode == "api-key":
            log.warning(
                "vllm-surgery: %s=api-key: feedback from anyone with the API key is calibration data%s",
                TRUST_ENV,
                " and queues automatic refinements whose results are served" if auto_refine else "",
            )
        elif self._reviewer is None and self.admin._digest is None:
            log.warning(
                "vllm-surgery: feedback is stored but none counts as calibration data: set %s (or the "
                "admin token) and send it as %s with reviewers' feedback",
                REVIEWER_ENV,
                REVIEWER_HEADER,
            )
        else:
            log.info(
                "vllm-surgery: feedback counts as calibration data only with the reviewer or admin token"
            )

    def is_reviewer(self, request: Request) -> bool:
        """Whether the request carries the reviewer token, or the admin token (the admin can change the
        served weights directly: trusting their feedback grants nothing more)."""
        given = request.headers.get(REVIEWER_HEADER, "")
        reviewer = (
            bool(given)
            and self._reviewer is not None
            and secrets.compare_digest(_digest(given), self._reviewer)
        )
        admin = self.admin.refusal(request, "feedback") is None
        return reviewer or admin

    def judge(self, request: Request) -> tuple[bool, bool, str]:
        """(trusted, reviewer, client) of a feedback request: whether it counts as calibration data,
        whether a reviewer sent it, and who sent it (a digest of the API key with the peer address:
        never the key itself) for the per-client bound on corrections."""
        reviewer = self.is_reviewer(request)
        if reviewer:
            return True, True, "reviewer"
        _, _, key = request.headers.get("Authorization", "").partition(" ")
        host = request.client.host if request.client is not None else "unknown"
        client = f"key:{_digest(key.strip()).hex()[:16]}@{host}"
        return self.mode == "api-key", False, client
