"""`/v1/models`: the deployments the caller's project may use, as models, each with the
batch endpoints it serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from batchery.api import wire
from batchery.api.deps import Caller, Service
from batchery.api.responses import ok
from batchery.model.deployments import Deployment
from batchery.model.exceptions import NotFound

router = APIRouter()


def _model(item: tuple[Deployment, frozenset[str]]) -> dict[str, Any]:
    return wire.model_object(*item)


@router.get("/models", responses=ok(wire.ModelList, "The models the caller's project may "
                                                       "use."))
def list_models(caller: Caller, service: Service) -> Any:
    return wire.list_object(service.model_endpoints(caller.project), _model)


@router.get("/models/{model_id:path}", responses=ok(wire.ModelObject, "The model."))
def retrieve_model(model_id: str, caller: Caller, service: Service) -> Any:
    for item in service.model_endpoints(caller.project):
        if item[0].name == model_id:
            return _model(item)
    raise NotFound(f"The model '{model_id}' does not exist", param="model")
