"""`/api/v1/keys`: admins list, create and revoke API keys. The key itself is shown once,
in the answer that creates it; listings never show a key or its hash."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from batchery.api import responses as docs
from batchery.api.bodies import NEW_KEY, json_body
from batchery.api.deps import Admin, Keys
from batchery.model.exceptions import ConfigError, Conflict, InvalidRequest
from batchery.security import auth
from batchery.security.auth import KeyEntry, KeyRing
from batchery.security.trust import Role

router = APIRouter()
T = TypeVar("T")
_CREATE_FIELDS = ("project", "role", "name")


def _entry_json(entry: KeyEntry) -> dict[str, Any]:
    return {**entry.public(), "object": "api_key"}


def _keys_path(keys: KeyRing) -> Path:
    if keys.path is None:
        raise Conflict("This server has no keys file, so it has no keys to manage: "
                       "start it with `--keys-file FILE`.")
    return keys.path


def _in_file(fn: Callable[[], T]) -> T:
    """Runs a change of the keys file; a file made unreadable by hand is a conflict to
    resolve on the server, not an error of the request."""
    try:
        return fn()
    except ConfigError as exc:
        raise Conflict(f"The keys file cannot be changed now: {exc}.") from None


@router.get("/keys", responses=docs.ok(docs.ApiKeyList, "Every key, revoked ones too."))
def list_keys(_: Admin, keys: Keys) -> Any:
    _keys_path(keys)
    return {"object": "list", "data": [_entry_json(e) for e in keys.entries()]}


def _create_args(body: dict[str, Any]) -> tuple[str, Role, str | None]:
    unknown = sorted(set(body) - set(_CREATE_FIELDS))
    if unknown:
        raise InvalidRequest(f"Unknown parameter: '{unknown[0]}'. Known: "
                             f"{', '.join(_CREATE_FIELDS)}.", param=unknown[0],
                             code="unknown_parameter")
    if "project" not in body:
        raise InvalidRequest("Missing required parameter: 'project'.", param="project",
                             code="missing_required_parameter")
    project = auth.check_name(body["project"], "project")
    role = auth.parse_role(body.get("role", Role.MEMBER.value))
    name = body.get("name")
    return project, role, None if name is None else auth.check_name(name, "name")


@router.post("/keys", responses=docs.ok(docs.NewApiKey, "The key: shown this once."),
             openapi_extra=NEW_KEY)
async def create_key(request: Request, _: Admin, keys: Keys) -> Any:
    path = _keys_path(keys)
    project, role, name = _create_args(await json_body(request))
    entry, key = await run_in_threadpool(
        _in_file, lambda: auth.add_key(path, project, role=role, name=name))
    keys.refresh(force=True)
    return {**_entry_json(entry), "key": key}


@router.delete("/keys/{name}", responses=docs.ok(docs.ApiKey, "The key, revoked."))
def revoke_key(name: str, _: Admin, keys: Keys) -> Any:
    # Over REST an admin could lock every admin out; the CLI, run by the operator, may.
    path = _keys_path(keys)
    entry = _in_file(lambda: auth.revoke_key(path, name, keep_an_admin=True))
    keys.refresh(force=True)
    return _entry_json(entry)
