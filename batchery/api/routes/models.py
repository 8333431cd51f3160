"""`/v1/models`: the deployments, as models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from batchery.api import wire
from batchery.api.deps import Project, Service
from batchery.exceptions import NotFound

router = APIRouter()


@router.get("/models")
def list_models(_: Project, service: Service) -> Any:
    return wire.list_object(service.list_models(), wire.model_object)


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, _: Project, service: Service) -> Any:
    for deployment in service.list_models():
        if deployment.name == model_id:
            return wire.model_object(deployment)
    raise NotFound(f"The model '{model_id}' does not exist", param="model")
