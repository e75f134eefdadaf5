"""API authentication: the session (with CSRF) for pages, a bearer token for scripts."""

import hashlib
import secrets
from datetime import timedelta

from django.utils import timezone
from ninja.security import HttpBearer, django_auth

from labeling.models import ApiToken

LAST_USED_RESOLUTION = timedelta(seconds=60)


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
        now = timezone.now()
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
            # At most one write a minute per token: a busy script must not add a write (and, on
            # SQLite, a wait for the database's single write lock) to every request.
            ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
        request.user = row.user
        return row.user


# Tried in order: a bearer token (no CSRF needed: no cookie is involved), then the session
# (django_auth checks CSRF on unsafe methods).
api_auth = [TokenAuth(), django_auth]
