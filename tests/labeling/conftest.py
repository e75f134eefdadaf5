"""Fixtures shared by the labeling tests: users, a project with members, and a factory
that fills a project with prompts, completions and items."""

import pytest
from django.contrib.auth import get_user_model

from labeling import services
from labeling.models import Completion, Membership


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    # PBKDF2's 1M iterations cost ~0.5 s per user on a busy CI box; these tests are not about it.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def make_user(db):
    def make(username, password="pw-for-tests-only-1", **extra):
        return get_user_model().objects.create_user(username=username, password=password, **extra)

    return make


@pytest.fixture
def admin_user(make_user):
    return make_user("alice-admin")


@pytest.fixture
def labeler(make_user):
    return make_user("bob-labeler")


@pytest.fixture
def make_items():
    """make_items(project, n, k=None, texts=None) -> list[Item]: n prompts, one item each."""

    def make(project, n, k=None, texts=None):
        k = k or project.k
        items = []
        for i in range(n):
            prompt = services.prompt_create(project=project, text=f"Prompt {i}: what is {i} + {i}?")
            for j in range(k):
                text = texts[j] if texts else f"Answer {j} to prompt {i}"
                services.completion_create(
                    prompt=prompt, text=text, source=Completion.Source.IMPORT
                )
            items += services.items_create_for_prompt(project=project, prompt=prompt)
        return items

    return make


@pytest.fixture
def project(admin_user, labeler):
    project = services.project_create(name="Helpfulness", created_by=admin_user, k=4)
    services.membership_set(project=project, user=labeler, role=Membership.Role.LABELER)
    return project
