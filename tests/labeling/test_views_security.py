"""IDOR and CSRF: a labeler reaches nothing outside their projects (404), admin pages need
the admin role, and every write refuses a request without a CSRF token."""

import json

import pytest
from django.test import Client
from django.urls import reverse

from labeling import services
from labeling.models import Membership, Ranking

pytestmark = pytest.mark.django_db


@pytest.fixture
def other_project(admin_user, make_items):
    project = services.project_create(name="Other team", created_by=admin_user)
    make_items(project, 2)
    return project


@pytest.fixture
def labeler_client(labeler):
    client = Client()
    client.force_login(labeler)
    return client


def _post_json(client, url, body):
    return client.post(url, json.dumps(body), content_type="application/json")


@pytest.mark.parametrize("name", ["project_dashboard", "label", "project_export"])
def test_a_labeler_gets_404_on_pages_of_a_project_they_are_not_in(
    labeler_client, other_project, name
):
    assert (
        labeler_client.get(reverse(f"labeling:{name}", args=[other_project.pk])).status_code == 404
    )


def test_a_labeler_gets_404_on_the_next_item_of_another_project(labeler_client, other_project):
    url = reverse("labeling:label_next", args=[other_project.pk])
    assert _post_json(labeler_client, url, {}).status_code == 404


@pytest.mark.parametrize("action", ["item_submit", "item_skip", "item_flag"])
def test_a_labeler_gets_404_on_items_of_another_project(
    labeler_client, other_project, admin_user, action
):
    lease = services.assignment_next(project=other_project, user=admin_user)
    url = reverse(f"labeling:{action}", args=[other_project.pk, lease.item_id])
    body = {"groups": [[c] for c in lease.display_order], "reason": "x"}
    assert _post_json(labeler_client, url, body).status_code == 404
    assert not Ranking.objects.exists()


def test_an_item_id_of_another_project_under_my_project_url_is_404(
    labeler_client, project, other_project, admin_user
):
    lease = services.assignment_next(project=other_project, user=admin_user)
    url = reverse("labeling:item_submit", args=[project.pk, lease.item_id])
    response = _post_json(labeler_client, url, {"groups": [[c] for c in lease.display_order]})
    assert response.status_code == 404
    assert "does not exist or is not in this project" in response.json()["error"]


@pytest.mark.parametrize("name", ["member_add", "project_import"])
def test_admin_writes_are_404_for_a_labeler_member(labeler_client, project, name):
    response = labeler_client.post(
        reverse(f"labeling:{name}", args=[project.pk]), {"username": "bob-labeler", "role": "admin"}
    )
    assert response.status_code == 404
    assert Membership.objects.get(project=project, user__username="bob-labeler").role == "labeler"


def test_the_dashboard_sends_a_labeler_to_the_ranking_page(labeler_client, project):
    response = labeler_client.get(reverse("labeling:project_dashboard", args=[project.pk]))
    assert response.status_code == 302
    assert response["Location"] == reverse("labeling:label", args=[project.pk])


def test_a_labeler_cannot_create_projects(labeler_client):
    assert labeler_client.get(reverse("labeling:project_create")).status_code == 403


def test_pages_require_login(client, project):
    response = client.get(reverse("labeling:label", args=[project.pk]))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_a_submit_without_a_csrf_token_is_refused(labeler, project, make_items):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    client = Client(enforce_csrf_checks=True)
    client.force_login(labeler)
    url = reverse("labeling:item_submit", args=[project.pk, lease.item_id])
    response = _post_json(client, url, {"groups": [[c] for c in lease.display_order]})
    assert response.status_code == 403
    assert not Ranking.objects.exists()


def test_a_submit_with_the_csrf_token_of_the_page_is_accepted(labeler, project, make_items):
    make_items(project, 1)
    client = Client(enforce_csrf_checks=True)
    client.force_login(labeler)
    page = client.get(reverse("labeling:label", args=[project.pk]))
    token = page.context["csrf_token"]
    lease = services.assignment_next(project=project, user=labeler)
    response = client.post(
        reverse("labeling:item_submit", args=[project.pk, lease.item_id]),
        json.dumps({"groups": [[c] for c in lease.display_order]}),
        content_type="application/json",
        HTTP_X_CSRFTOKEN=str(token),
    )
    assert response.status_code == 200, response.content
    assert Ranking.objects.count() == 1


@pytest.mark.parametrize(
    "name, data",
    [
        ("member_add", {"username": "bob-labeler", "role": "admin"}),
        ("project_import", {}),
    ],
)
def test_admin_forms_without_a_csrf_token_are_refused(admin_user, project, name, data):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.post(reverse(f"labeling:{name}", args=[project.pk]), data).status_code == 403
    assert Membership.objects.get(project=project, user__username="bob-labeler").role == "labeler"


def test_skip_and_flag_without_a_csrf_token_are_refused(labeler, project, make_items):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    client = Client(enforce_csrf_checks=True)
    client.force_login(labeler)
    for action in ("item_skip", "item_flag"):
        url = reverse(f"labeling:{action}", args=[project.pk, lease.item_id])
        assert _post_json(client, url, {"reason": "x"}).status_code == 403
    lease.refresh_from_db()
    assert lease.status == "active"
