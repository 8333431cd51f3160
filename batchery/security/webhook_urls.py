"""Webhook receiver URLs: what one must look like, and the operator's upstream allow-list
for it. Every product that takes a `webhook_url` (batches, message batches, jobs) and the
webhook endpoints API check URLs here, so that no product imports another for it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from batchery.model.exceptions import InvalidRequest
from batchery.security import deployment_policy
from batchery.security.trust import TrustPolicy

MAX_URL_CHARS = 2048
#: Who a refused receiver URL belongs to, in the allow-list's refusal.
_WHO = "webhook URLs"


#: A receiver URL, as JSON Schema (the API documents its bodies with it): what
#: `check_webhook_url` accepts, but for the operator's allow-list. Ports 1 to 65535.
_PORT = ("[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]"
         "|6553[0-5]")
URL_JSON_SCHEMA: dict[str, Any] = {
    "type": "string", "maxLength": MAX_URL_CHARS,
    "pattern": "^https?://[A-Za-z0-9]([A-Za-z0-9.-]{0,200}[A-Za-z0-9])?(:(" + _PORT + "))?"
               "(/[A-Za-z0-9._~/%-]*)?$",
    "description": "An http(s) URL to a host the operator allows (security.upstream_hosts)."}


def check_webhook_url(value: Any, policy: TrustPolicy, param: str = "url") -> str:
    """`value` as a receiver URL: an http(s) URL that names its host, to a host the operator
    allows (in open mode, any host: the one local user's own receiver included)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for '{param}': expected a string (an http or "
                             f"https URL).", param=param, code="invalid_type")
    if len(value) > MAX_URL_CHARS:
        raise InvalidRequest(f"'{param}' is {len(value)} characters long; at most "
                             f"{MAX_URL_CHARS} are allowed.", param=param, code="invalid_value")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (reading it checks the port)
    except ValueError:
        raise InvalidRequest(f"Invalid value for '{param}': '{value}' is not a valid URL.",
                             param=param, code="invalid_value") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname \
            or any(c.isspace() for c in value):
        raise InvalidRequest(f"Invalid value for '{param}': expected an http or https URL that "
                             f"names its host, such as 'https://example.com/webhooks'.",
                             param=param, code="invalid_value")
    if not policy.open:
        deployment_policy.check_url(value, policy, param, who=_WHO)
    return value


def optional_webhook_url(body: Mapping[str, Any], policy: TrustPolicy) -> str | None:
    """The `webhook_url` extension of a create body (a batch, message batch or job):
    None when absent or null, else a checked receiver URL."""
    value = body.get("webhook_url")
    return None if value is None else check_webhook_url(value, policy, "webhook_url")
