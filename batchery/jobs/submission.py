"""Reading a job submission: exactly one input and the options, with a 400 that names the
field and says what was expected."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchery.model.exceptions import InvalidRequest
from batchery.model.jobs import (
    DEFAULT_ERROR_THRESHOLD,
    DEFAULT_MAX_RETRIES,
    InputKind,
    JobInput,
    JobOptions,
    OutputMode,
)
from batchery.model.priority import DEFAULT_PRIORITY, parse_priority

_INPUTS = tuple(k.value for k in InputKind)
_OPTIONS = ("deployment", "workers", "config", "timeout", "batch_timeout", "max_retries",
            "error_threshold", "output", "output_path", "dry_run", "webhook_url", "priority")
#: The largest whole number a submission may give (batch sizes, retries, workers): what
#: the database and JSON encoders hold, far beyond any useful value.
MAX_INT = 2**31 - 1
#: Most items an `item_list` may carry inline; larger datasets belong in files.
MAX_INLINE_ITEMS = 1_000_000


@dataclass(frozen=True, kw_only=True, slots=True)
class Submission:
    input: JobInput
    options: JobOptions
    deployment: str | None
    output_path: str | None
    dry_run: bool
    #: Extension: a receiver of the job's end event, as given (the job service checks it
    #: against the operator's allow-list).
    webhook_url: str | None = None
    #: Extension: higher is claimed first.
    priority: int = DEFAULT_PRIORITY


def parse(body: Any) -> Submission:
    if not isinstance(body, Mapping):
        raise InvalidRequest("The request body must be a JSON object.", param="body")
    unknown = sorted(set(body) - set(_INPUTS) - set(_OPTIONS))
    if unknown:
        raise InvalidRequest(f"Unknown field '{unknown[0]}'. Known fields: "
                             f"{', '.join(_INPUTS + _OPTIONS)}.", param=unknown[0])
    given = [k for k in _INPUTS if body.get(k) is not None]
    if not given:
        raise InvalidRequest("Give exactly one input: item_list, file_path_lister or "
                             "delimited_files.", param="item_list")
    if len(given) > 1:
        raise InvalidRequest(f"Give exactly one input, not {' and '.join(given)}.",
                             param=given[1])
    kind = InputKind(given[0])
    return Submission(input=_input(kind, body[kind.value]), options=_options(body),
                      deployment=_optional_str(body, "deployment"),
                      output_path=_optional_str(body, "output_path"),
                      dry_run=_bool(body, "dry_run"),
                      webhook_url=_optional_str(body, "webhook_url"),
                      priority=parse_priority(body.get("priority")))


def _input(kind: InputKind, raw: Any) -> JobInput:
    name = kind.value
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"'{name}' must be an object.", param=name)
    known = {"items", "batch_size"} if kind is InputKind.ITEM_LIST else \
        {"paths", "file_ids", "includes", "excludes", "batch_size"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidRequest(f"Unknown field '{name}.{unknown[0]}'. Known: "
                             f"{', '.join(sorted(known))}.", param=f"{name}.{unknown[0]}")
    batch_size = _int(raw, "batch_size", name, minimum=1, default=None)
    if batch_size is None:
        raise InvalidRequest(f"'{name}.batch_size' is required: how many items go in a "
                             f"batch (a whole number >= 1).", param=f"{name}.batch_size")
    if kind is InputKind.ITEM_LIST:
        items = raw.get("items")
        if not isinstance(items, list) or not items:
            raise InvalidRequest("'item_list.items' must be a non-empty list.",
                                 param="item_list.items")
        if len(items) > MAX_INLINE_ITEMS:
            raise InvalidRequest(f"'item_list.items' holds {len(items)} items; at most "
                                 f"{MAX_INLINE_ITEMS} may be sent inline. Put larger "
                                 f"datasets in files (delimited_files).",
                                 param="item_list.items")
        return JobInput(kind=kind, batch_size=batch_size, items=items)
    paths = _strings(raw, "paths", name)
    # Each file once, in the order given: the worker reads them in this order.
    file_ids = tuple(dict.fromkeys(_strings(raw, "file_ids", name)))
    if not paths and not file_ids:
        raise InvalidRequest(f"'{name}.paths' (paths or URLs) or '{name}.file_ids' (ids of "
                             f"uploaded files) must be a non-empty list.",
                             param=f"{name}.paths")
    return JobInput(kind=kind, batch_size=batch_size, paths=paths, file_ids=file_ids,
                    includes=_strings(raw, "includes", name),
                    excludes=_strings(raw, "excludes", name))


def _options(body: Mapping[str, Any]) -> JobOptions:
    config = body.get("config")
    config = {} if config is None else config  # 0, "" or [] are no objects
    if not isinstance(config, Mapping):
        raise InvalidRequest("'config' must be an object.", param="config")
    output = body.get("output", OutputMode.APPEND_ROW.value)
    if not isinstance(output, str) or output not in {m.value for m in OutputMode}:
        raise InvalidRequest("'output' must be 'append_row' or 'summary_only'.",
                             param="output")
    return JobOptions(
        workers=_int(body, "workers", None, minimum=1, default=None),
        config=dict(config),
        timeout_s=_seconds(body, "timeout"),
        batch_timeout_s=_seconds(body, "batch_timeout"),
        max_retries=_int(body, "max_retries", None, minimum=0, default=DEFAULT_MAX_RETRIES)
        or 0,
        error_threshold=_int(body, "error_threshold", None, minimum=-1,
                             default=DEFAULT_ERROR_THRESHOLD) or 0,
        output=OutputMode(output))


def _field(parent: str | None, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _int(raw: Mapping[str, Any], key: str, parent: str | None, *, minimum: int,
         default: int | None) -> int | None:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON does not tell 2.0 from 2
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise InvalidRequest(f"'{_field(parent, key)}' must be a whole number from {minimum} "
                             f"to {MAX_INT}.", param=_field(parent, key))
    return value


def _seconds(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidRequest(f"'{key}' must be a positive number of seconds.", param=key)
    return float(value)


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be true or false.", param=key)
    return value


def _optional_str(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidRequest(f"'{key}' must be a non-empty string.", param=key)
    return value


def _strings(raw: Mapping[str, Any], key: str, parent: str) -> tuple[str, ...]:
    value = raw.get(key)
    value = [] if value is None else value  # 0, "" or {} are no lists
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidRequest(f"'{parent}.{key}' must be a list of non-empty strings.",
                             param=f"{parent}.{key}")
    return tuple(value)
