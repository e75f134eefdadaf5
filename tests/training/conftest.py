"""Shared fixtures for the training tests: users, a project with ranked items, the worker."""

from __future__ import annotations

import pytest

from labeling.models import Membership
from tests.training.factories import make_project
from tests.training.worker_fixtures import (  # noqa: F401  (fixtures)
    celery_worker,
    checkpoint_dir,
    tiny_model,
    worker,
)


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_user(username="trainer", password="pw-trainer-123")


@pytest.fixture
def labeler_user(django_user_model):
    return django_user_model.objects.create_user(username="labeler1", password="pw-labeler-123")


@pytest.fixture
def project(admin_user, labeler_user):
    project = make_project(user=admin_user)
    Membership.objects.create(project=project, user=labeler_user, role=Membership.Role.LABELER)
    return project


@pytest.fixture
def other_project(django_user_model):
    stranger = django_user_model.objects.create_user(
        username="stranger", password="pw-stranger-123"
    )
    return make_project(user=stranger, name="Someone else's project")


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client
