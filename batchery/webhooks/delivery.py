"""The delivery loop: runs in every worker process (a thread of its own), never in a request.

Each round claims up to `concurrency` due deliveries, each under a lease (so two workers
never send the same delivery at the same moment), POSTs them concurrently, and records each
attempt: any 2xx succeeds; anything else (another status, a redirect, a timeout, a refused
connection) is retried with exponential backoff and jitter until `RETRY_FOR_S` after the
event, then given up. An attempt cut short by a crash is sent again once its lease runs out:
delivery is at least once, and every attempt carries the event's id as `webhook-id`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from batchery.model import webhooks as model
from batchery.model.webhooks import AttemptResult, DeliveryClaim
from batchery.ports.webhooks import WebhookOutbox
from batchery.webhooks import signing

log = logging.getLogger("batchery.webhooks")

#: Environment variable: seconds between looks at the outbox when it had nothing due.
POLL_ENV = "BATCHERY_WEBHOOK_POLL_S"
DEFAULT_POLL_S = 0.5


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be zero or more seconds, not {raw!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    #: The first retry's delay; each next one doubles, up to `max_delay_s`, before jitter.
    retry_base_s: float = field(default_factory=lambda: _env_float(
        model.RETRY_BASE_ENV, model.DEFAULT_RETRY_BASE_S))
    max_delay_s: float = model.MAX_RETRY_DELAY_S
    retry_for_s: float = model.RETRY_FOR_S
    timeout_s: float = model.TIMEOUT_S
    #: Longer than any round can take (the timeout bounds it), so a lease never runs out
    #: under a live worker; short, so that an attempt cut off by a crash is sent again soon.
    lease_s: float = 15.0
    poll_s: float = field(default_factory=lambda: _env_float(POLL_ENV, DEFAULT_POLL_S))
    concurrency: int = 8


def retry_delay(attempt: int, config: DeliveryConfig,
                rand: Callable[[], float] = random.random) -> float:
    """The delay after failed attempt number `attempt` (1 is the first): exponential, capped,
    and jittered between half and all of it so that failed receivers are not hit in step."""
    step = min(config.max_delay_s, config.retry_base_s * 2.0 ** min(attempt - 1, 60))
    return step * (0.5 + 0.5 * rand())


def retry_in(claim: DeliveryClaim, config: DeliveryConfig, now: float,
             rand: Callable[[], float] = random.random) -> float | None:
    """When to try a failed delivery again, or None to give up: past the retry window."""
    delay = retry_delay(claim.delivery.attempts + 1, config, rand)
    if now + delay > claim.delivery.created_at + config.retry_for_s:
        return None
    return delay


def _describe_status(code: int) -> str | None:
    if 200 <= code < 300:
        return None
    if 300 <= code < 400:
        return f"the receiver answered HTTP {code} (a redirect, which is never followed)"
    return f"the receiver answered HTTP {code}"


async def post(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: str,
               timeout_s: float) -> AttemptResult:
    """POST one attempt. Only the status code is kept: the receiver's body is never read
    (nor shown to anyone); the whole exchange has `timeout_s`."""
    started = time.monotonic()
    code: int | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, content=body.encode(),
                                     headers=headers) as response:
                code = response.status_code
    except TimeoutError:
        error = f"the receiver did not answer within {timeout_s:g}s"
    except httpx.TimeoutException:
        error = f"the receiver did not answer within {timeout_s:g}s"
    except httpx.HTTPError as exc:
        error = f"could not reach the receiver: {type(exc).__name__}"
    except OSError as exc:
        error = f"could not reach the receiver: {exc.strerror or type(exc).__name__}"
    latency_ms = int((time.monotonic() - started) * 1000)
    if code is not None:
        error = _describe_status(code)
    return AttemptResult(success=code is not None and error is None, status_code=code,
                         latency_ms=latency_ms, error=error)


class WebhookDelivery:
    """Sends due deliveries from the outbox; `run_once` is one round, `start` a thread."""

    def __init__(self, store: WebhookOutbox, owner: str,
                 config: DeliveryConfig | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.owner = owner
        self.config = config or DeliveryConfig()
        self.clock = clock
        self._project_secrets: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one round ---------------------------------------------------------------------

    def claim_due(self) -> list[DeliveryClaim]:
        claims: list[DeliveryClaim] = []
        while len(claims) < self.config.concurrency:
            claim = self.store.claim_webhook_delivery(self.owner, self.config.lease_s)
            if claim is None:
                break
            claims.append(claim)
        return claims

    def run_once(self) -> int:
        """Send what is due now (at most `concurrency`); returns how many were attempted."""
        claims = self.claim_due()
        if claims:
            asyncio.run(self._send_all(claims))
        return len(claims)

    async def _send_all(self, claims: list[DeliveryClaim]) -> None:
        # No proxies from the environment, no redirects: the URL named is the one reached.
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                     timeout=self.config.timeout_s) as client:
            results = await asyncio.gather(*(self._attempt(client, c) for c in claims))
        for claim, result in zip(claims, results, strict=True):
            self._record(claim, result)

    async def _attempt(self, client: httpx.AsyncClient, claim: DeliveryClaim) -> AttemptResult:
        try:
            keys = self._signing_secrets(claim)
        except Exception as exc:  # a secret that cannot be opened: record it, retry later
            log.exception("cannot sign delivery %d", claim.delivery.id)
            return AttemptResult(success=False, status_code=None, latency_ms=0,
                                 error=f"the delivery could not be signed: {exc}")
        url = claim.endpoint.url if claim.endpoint is not None else claim.delivery.url
        headers = signing.headers(keys, claim.delivery.event_id, int(self.clock()), claim.body)
        return await post(client, url, headers, claim.body, self.config.timeout_s)

    def _signing_secrets(self, claim: DeliveryClaim) -> list[str]:
        if claim.endpoint is not None:
            return claim.endpoint.secrets.active(self.clock())
        project = claim.delivery.project
        if project not in self._project_secrets:
            self._project_secrets[project] = signing.project_signing_secret(
                self.store, project)
        return [self._project_secrets[project]]

    def _record(self, claim: DeliveryClaim, result: AttemptResult) -> None:
        delivery = claim.delivery
        again = None if result.success else retry_in(claim, self.config, self.clock())
        if not self.store.record_webhook_attempt(claim, result, retry_in=again):
            log.info("delivery %d of %s: lease lost before its attempt was recorded",
                     delivery.id, delivery.event_id)
        elif not result.success:
            log.info("delivery of %s to %s failed (attempt %d): %s; %s", delivery.event_id,
                     delivery.endpoint_id or "its webhook_url", delivery.attempts + 1,
                     result.error, "giving up" if again is None or delivery.test
                     else f"retrying in {again:.1f}s")

    # -- the thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-delivery",
                                        daemon=True)
        self._thread.start()

    def stop(self, wait_s: float | None = None) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.config.timeout_s + 2.0 if wait_s is None else wait_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.run_once()
            except Exception:
                log.exception("webhook delivery round failed; trying again shortly")
                sent = 0
            if not sent:
                self._stop.wait(self.config.poll_s)
