"""A URLconf for tests/config/test_error_pages.py: views that fail on purpose."""

from django.core.exceptions import PermissionDenied
from django.urls import include, path


def boom(request):
    raise RuntimeError("a bug")


def forbidden(request):
    raise PermissionDenied("not yours")


urlpatterns = [
    path("boom/", boom),
    path("forbidden/", forbidden),
    path("", include("config.urls")),
]
