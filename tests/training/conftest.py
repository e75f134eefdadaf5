"""Fixtures of the training tests: `project` holds ranked items, and the real worker. The
personas (admin_user, labeler, outsider) come from tests/conftest.py."""

from __future__ import annotations

import pytest

from labeling import services
from labeling.models import Membership
from tests.training.factories import make_project
from tests.training.worker_fixtures import (  # noqa: F401  (fixtures)
    celery_worker,
    checkpoint_dir,
    tiny_model,
    worker,
)


@pytest.fixture
def project(admin_user, labeler):
    project = make_project(user=admin_user)
    services.membership_set(project=project, user=labeler, role=Membership.Role.LABELER)
    return project


@pytest.fixture
def other_project(outsider):
    """A project of the outsider's, which `admin_user` must not reach."""
    return make_project(user=outsider, name="Someone else's project")
