"""One JSON API with an OpenAPI schema at /api/docs. Pages use session auth with CSRF;
scripts send `Authorization: Bearer <token>` (see labeling.auth)."""

from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError

from labeling.api import router as labeling_router
from labeling.auth import api_auth
from training.api import router as training_router

api = NinjaAPI(title="RLHF Studio API", version="1", auth=api_auth)
api.add_router("/", labeling_router)
api.add_router("/", training_router)


@api.exception_handler(AuthenticationError)
def unauthorized(request, exc):
    detail = "Log in, or send Authorization: Bearer <token> (see the API tokens page)."
    return api.create_response(request, {"detail": detail, "code": "unauthorized"}, status=401)


@api.exception_handler(Http404)
def not_found(request, exc):
    """A 404 in the shape of every other refusal: {"detail", "code"}. Objects outside what the
    caller may see are answered the same way as objects that do not exist."""
    detail = str(exc) or "Not found."
    return api.create_response(request, {"detail": detail, "code": "not_found"}, status=404)
