"""`/v1/models`: the deployments the caller's project may use, as models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from batchery.api import wire
from batchery.api.deps import Caller, Service
from batchery.api.responses import ok
from batchery.exceptions import NotFound

router = APIRouter()


@router.get("/models", responses=ok(wire.ModelList, "The models the caller's project may "
                                                       "use."))
def list_models(caller: Caller, service: Service) -> Any:
    return wire.list_object(service.list_models(caller.project), wire.model_object)


@router.get("/models/{model_id:path}", responses=ok(wire.ModelObject, "The model."))
def retrieve_model(model_id: str, caller: Caller, service: Service) -> Any:
    for deployment in service.list_models(caller.project):
        if deployment.name == model_id:
            return wire.model_object(deployment)
    raise NotFound(f"The model '{model_id}' does not exist", param="model")
