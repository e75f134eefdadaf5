"""The cast every Django test shares: the fast password hasher, three personas (an admin, a
labeler and an outsider with no access to anything) and a project built through the services,
as the pages and the API build one. tests/training/conftest.py swaps in a project that already
holds ranked items; the engine tests (tests/rlhf) use none of this."""

import pytest

from labeling import services
from labeling.models import Membership


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    # PBKDF2's 1M iterations cost ~0.5 s per user on a 2-core box; only the login throttle
    # tests are about hashing, and they time it on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def make_user(db, django_user_model):
    def make(username, password="pw-for-tests-only-1", **extra):
        return django_user_model.objects.create_user(username=username, password=password, **extra)

    return make


@pytest.fixture
def admin_user(make_user):
    """Admin of `project` (its creator)."""
    return make_user("alice-admin")


@pytest.fixture
def labeler(make_user):
    """Labeler of `project`."""
    return make_user("bob-labeler")


@pytest.fixture
def outsider(make_user):
    """A logged-in user with no membership anywhere: must reach nothing of `project`."""
    return make_user("eve-outsider")


@pytest.fixture
def project(admin_user, labeler):
    project = services.project_create(name="Helpfulness", created_by=admin_user, k=4)
    services.membership_set(project=project, user=labeler, role=Membership.Role.LABELER)
    return project


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client
