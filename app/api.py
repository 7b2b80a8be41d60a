"""Every `/v1` router. A new resource package adds its router here."""

from fastapi import APIRouter

from app.catalog.endpoints import router as models_router
from app.corpora.endpoints import router as corpora_router
from app.instruction_sets.endpoints import router as instruction_sets_router
from app.jobs.chat import router as chat_router
from app.jobs.endpoints import router as jobs_router
from app.keys.endpoints import router as keys_router
from app.webhooks.endpoints import router as webhooks_router

api_router = APIRouter(prefix="/v1")
api_router.include_router(instruction_sets_router)
api_router.include_router(corpora_router)
api_router.include_router(jobs_router)
api_router.include_router(chat_router)
api_router.include_router(webhooks_router)
api_router.include_router(keys_router)
api_router.include_router(models_router)
