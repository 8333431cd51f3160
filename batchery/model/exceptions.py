"""The exceptions Batchery raises. Adapters translate foreign exceptions into these.

* BatcheryError
  * NotFound: the object does not exist, or belongs to another project.
  * Conflict: the object is in a state that forbids the operation.
  * InvalidRequest: the caller sent something we cannot accept (names the parameter).
  * Unauthorized: a key was missing or unknown.
  * Forbidden: the key is known, but its role or project may not do this.
  * TooLarge: a request body or upload is over the operator's limit.
  * ConfigError: a configuration file or option is wrong.
  * BackendError: a model backend could not be loaded or failed as a whole.
"""

from __future__ import annotations


class BatcheryError(Exception):
    """Base class of every Batchery error."""


class NotFound(BatcheryError):
    def __init__(self, message: str, *, param: str | None = "id") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Conflict(BatcheryError):
    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidRequest(BatcheryError):
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class Unauthorized(BatcheryError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Forbidden(BatcheryError):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class TooLarge(BatcheryError):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(BatcheryError):
    """A configuration file or option is invalid."""


class BackendError(BatcheryError):
    """A model backend or provider failed as a whole (not a single request). `permanent`
    errors (a refused credential, a rejected request) will not pass by trying again."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
