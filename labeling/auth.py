"""API authentication: the session (with CSRF) for pages, a bearer token for scripts."""

import hashlib
import secrets

from django.utils import timezone
from ninja.security import HttpBearer, django_auth

from labeling.models import ApiToken


def token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_token_create(*, user, name: str = "") -> str:
    """Create a token and return the raw value; only its hash is stored."""
    raw = secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name=name, key_hash=token_hash(raw))
    return raw


class TokenAuth(HttpBearer):
    def authenticate(self, request, token):
        row = ApiToken.objects.select_related("user").filter(key_hash=token_hash(token)).first()
        if row is None or not row.user.is_active:
            return None
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=timezone.now())
        request.user = row.user
        return row.user


# Tried in order: a bearer token (no CSRF needed: no cookie is involved), then the session
# (django_auth checks CSRF on unsafe methods).
api_auth = [TokenAuth(), django_auth]
