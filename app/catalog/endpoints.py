"""`/v1/models`: what a job can fine-tune, by name.

The same list for every team: the embedded default and the operator's model roots
(`GATT_MODEL_ROOTS`, read by `service/model_catalog.py`, which checks headers, never weights, and
caches each result until the folder changes). A team's own checkpoints are not models here: a job
continues one with `"model": {"job_id": ..., "step": ...}`. No response names a server path.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.auth.dependencies import CurrentTeam
from app.catalog.schemas import ModelInfo, ModelList
from app.core.db import SettingsDep
from app.core.errors import AUTH_RESPONSES, ERROR_RESPONSES, NotFound, error_response
from service import model_catalog

router = APIRouter(prefix="/models", tags=["models"])

ModelId = Annotated[
    str, Path(max_length=257, description='A model id from `GET /v1/models`, e.g. "default" or "org/name".')
]


@router.get("", response_model=ModelList, summary="List models", responses=AUTH_RESPONSES)
def list_models(team: CurrentTeam, settings: SettingsDep) -> ModelList:
    """Every model a job may name, with what the masks and the trainer will use; models under the roots
    that cannot be trained are listed with the reason."""
    return ModelList(data=[ModelInfo.of(m) for m in model_catalog.catalog(list(settings.model_roots))])


@router.get(
    "/{model_id:path}",
    response_model=ModelInfo,
    summary="Get a model",
    responses={**ERROR_RESPONSES, **error_response(404, "`not_found`: no model with this id.")},
)
def get_model(team: CurrentTeam, settings: SettingsDep, model_id: ModelId) -> ModelInfo:
    """One model by id."""
    try:
        return ModelInfo.of(model_catalog.find(model_id, list(settings.model_roots)))
    except model_catalog.ModelNotFound:
        raise NotFound("No model with this id; GET /v1/models lists them.", param="model_id") from None
