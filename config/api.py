"""One JSON API with an OpenAPI schema at /api/docs. Pages use session auth with CSRF;
scripts send `Authorization: Bearer <token>` (see labeling.auth)."""

from ninja import NinjaAPI

from labeling.api import router as labeling_router
from labeling.auth import api_auth
from training.api import router as training_router

api = NinjaAPI(title="RLHF Studio API", version="1", auth=api_auth)
api.add_router("/", labeling_router)
api.add_router("/", training_router)
