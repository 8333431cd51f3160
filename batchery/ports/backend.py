"""The model backend port: what a worker needs from a model, local or remote."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from batchery.model.batches import MESSAGES_ENDPOINT

CHAT_ENDPOINT = "/v1/chat/completions"
RESPONSES_ENDPOINT = "/v1/responses"
MODERATIONS_ENDPOINT = "/v1/moderations"


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class Reply:
    """The answer to one request, as the endpoint would have given it over HTTP."""

    status_code: int
    body: dict[str, Any]
    #: True when trying again later may succeed (429, 5xx, timeouts, dropped connections).
    retriable: bool = False
    #: The upstream's `Retry-After`, in seconds, when it gave one.
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


def error_reply(status_code: int, message: str, *, type_: str = "invalid_request_error",
                param: str | None = None, code: str | None = None,
                retriable: bool = False, retry_after: float | None = None) -> Reply:
    """A reply carrying an OpenAI error envelope."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Reply(status_code=status_code, body=body, retriable=retriable,
                 retry_after=retry_after)


class ModelBackend(ABC):
    """One loaded model (or one connection to a remote one), shared by a worker's chunks.

    A backend is opened once per worker process with `start()` and closed with `aclose()`.
    `infer` answers requests for one endpoint; it must return one `Reply` per request, in
    order, and must turn a bad request into an error reply rather than raise. Raising means
    the whole call failed (the model crashed), and the chunk is retried.
    """

    #: The endpoints this backend can answer.
    endpoints: frozenset[str] = frozenset()
    #: It imports and runs code that the deployment names (a user's predictor). Such a
    #: deployment needs the operator's consent when made over REST, and its backend is
    #: built in worker processes only, never by the API server.
    runs_user_code: ClassVar[bool] = False
    #: Its deployments can run native jobs (a pool of workers per deployment), not only
    #: batch lines.
    serves_jobs: ClassVar[bool] = False
    #: The most lines of a chunk handed to `infer` in one call; None: the engine's own
    #: slicing (a chunk in several concurrent slices, committed as each ends). A model
    #: that batches its inputs by length (an embedding model) sets it high: it sorts a
    #: whole chunk's inputs by length, where slices would pad short inputs to long ones.
    max_lines_per_call: ClassVar[int | None] = None

    @classmethod
    def check_options(cls, options: Mapping[str, Any], where: str,
                      base_dir: Path | None) -> dict[str, Any]:
        """A deployment's options, checked and normalised as its config is read, before any
        backend is built; errors name `where`. Relative paths resolve against `base_dir`
        (the config file's directory). Most backends check their options when built, so
        by default they are kept as given."""
        return dict(options)

    @classmethod
    def declared_endpoints(cls, options: Mapping[str, Any]) -> frozenset[str]:
        """The endpoints a deployment of this backend with these options answers itself,
        known without building it (the API server lists them; validation checks lines
        against them). A backend whose endpoints depend on its options overrides this."""
        return cls.endpoints

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model or open connections."""

    @abstractmethod
    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        """Answer each request."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the model or connections."""


def served_endpoints(declared: frozenset[str]) -> frozenset[str]:
    """The endpoints a deployment serves: those its backend declares, and those Batchery
    translates onto them. A chat backend also answers Responses and Anthropic Messages
    requests, translated to chat and back."""
    if CHAT_ENDPOINT in declared:
        return declared | {RESPONSES_ENDPOINT, MESSAGES_ENDPOINT}
    return declared
