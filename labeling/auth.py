"""API authentication: the session (with CSRF) for pages, a bearer token for scripts."""

import hashlib
import secrets
from datetime import UTC, timedelta

from django.contrib.auth import get_user_model
from django.utils import timezone
from ninja.security import HttpBearer, django_auth

from config.ids import as_id
from labeling.models import ApiToken

LAST_USED_RESOLUTION = timedelta(seconds=60)


def token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_token_create(*, user, name: str = "") -> str:
    """Create a token and return the raw value; only its hash is stored."""
    raw = secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name=name[:100], key_hash=token_hash(raw))
    return raw


def api_tokens_for_user(*, user):
    """The user's own tokens, newest first (never anyone else's)."""
    return ApiToken.objects.filter(user=user).order_by("-created_at", "-id")


def api_token_revoke(*, user, token_id) -> bool:
    """Delete one of the user's own tokens; False when they have no token with that id."""
    token_id = as_id(token_id)
    return token_id is not None and bool(
        ApiToken.objects.filter(user=user, pk=token_id).delete()[0]
    )


# The token's user in one cheap query (run on every scripted request): a raw query skips
# building a queryset; the extra columns arrive as attributes of the user.
_TOKEN_USER_SQL = """
SELECT u.*, t.id AS api_token_id, t.last_used_at AS api_token_last_used_at
FROM {user} u JOIN {token} t ON t.user_id = u.id
WHERE t.key_hash = %s
"""


class TokenAuth(HttpBearer):
    def authenticate(self, request, token):
        User = get_user_model()
        sql = _TOKEN_USER_SQL.format(user=User._meta.db_table, token=ApiToken._meta.db_table)
        rows = list(User.objects.raw(sql, [token_hash(token)]))
        if not rows or not rows[0].is_active:
            return None
        user = rows[0]
        now = timezone.now()
        last_used = ApiToken._meta.get_field("last_used_at").to_python(user.api_token_last_used_at)
        if last_used is not None and timezone.is_naive(last_used):
            last_used = timezone.make_aware(last_used, UTC)  # SQLite hands back naive UTC
        if last_used is None or now - last_used > LAST_USED_RESOLUTION:
            # At most one write a minute per token: a busy script must not add a write (and, on
            # SQLite, a wait for the database's single write lock) to every request.
            ApiToken.objects.filter(pk=user.api_token_id).update(last_used_at=now)
        request.user = user
        return user


# Tried in order: a bearer token (no CSRF needed: no cookie is involved), then the session
# (django_auth checks CSRF on unsafe methods).
api_auth = [TokenAuth(), django_auth]
