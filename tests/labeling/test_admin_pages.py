"""What a project's admin does without the Django admin: edit the settings, remove members,
create users and invite them with one-time links; pages and API, scoped and CSRF-protected."""

import json

import pytest
from django.test import Client
from django.urls import reverse

from labeling import services
from labeling.auth import api_token_create
from labeling.models import Item, Membership

pytestmark = pytest.mark.django_db


class Api:
    """JSON with a bearer token (no cookies, so no CSRF)."""

    def __init__(self, user):
        self.client = Client(enforce_csrf_checks=True)
        self.headers = {"Authorization": f"Bearer {api_token_create(user=user)}"}

    def call(self, method, path, body=None):
        data = json.dumps(body) if body is not None else ""
        return getattr(self.client, method)(
            f"/api{path}", data, content_type="application/json", headers=self.headers
        )


def _client(user, csrf=False):
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


# --------------------------------------------------------------------------- settings


def _settings_form(project, **changes):
    data = {
        "name": project.name,
        "instructions": project.instructions,
        "k": project.k,
        "annotations_per_item": project.annotations_per_item,
        "lease_seconds": project.lease_seconds,
    }
    if project.allow_ties:
        data["allow_ties"] = "on"
    data.update(changes)
    return {key: value for key, value in data.items() if value is not None}


def test_an_admin_edits_the_settings_on_the_settings_page(project, admin_client):
    url = reverse("labeling:project_settings", args=[project.pk])
    page = admin_client.get(url)
    assert page.status_code == 200 and b'value="Helpfulness"' in page.content
    response = admin_client.post(
        url,
        _settings_form(
            project,
            name="Helpfulness v2",
            instructions="Prefer *short* answers.",
            k=5,
            annotations_per_item=3,
            allow_ties=None,
            lease_seconds=600,
        ),
    )
    assert response.status_code == 302
    project.refresh_from_db()
    assert (project.name, project.instructions, project.k) == (
        "Helpfulness v2",
        "Prefer *short* answers.",
        5,
    )
    assert (project.annotations_per_item, project.allow_ties, project.lease_seconds) == (
        3,
        False,
        600,
    )
    dashboard = admin_client.get(reverse("labeling:project_dashboard", args=[project.pk]))
    assert b'id="edit-settings"' in dashboard.content


def test_k_is_fixed_once_the_project_has_items(project, admin_client, admin_user, make_items):
    make_items(project, 1)
    url = reverse("labeling:project_settings", args=[project.pk])
    assert b"Fixed: the project has items" in admin_client.get(url).content
    # the page's K field is read-only: a posted K is ignored, the rest is saved
    admin_client.post(url, _settings_form(project, k=6, name="Renamed"))
    project.refresh_from_db()
    assert (project.k, project.name) == (4, "Renamed")
    refused = Api(admin_user).call("patch", f"/projects/{project.pk}", {"k": 6})
    assert refused.status_code == 400
    assert (
        refused.json()["field"] == "k" and "K cannot change from 4 to 6" in refused.json()["detail"]
    )
    project.refresh_from_db()
    assert project.k == 4


def test_a_bad_setting_is_shown_on_its_field(project, admin_client):
    url = reverse("labeling:project_settings", args=[project.pk])
    response = admin_client.post(url, _settings_form(project, name="   ", annotations_per_item=0))
    assert response.status_code == 200
    form = response.context["form"]
    assert "name" in form.errors and "annotations_per_item" in form.errors


def test_the_api_patches_only_the_settings_it_is_given(project, admin_user):
    api = Api(admin_user)
    response = api.call("patch", f"/projects/{project.pk}", {"lease_seconds": 90, "k": 3})
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["lease_seconds"], body["k"], body["name"]) == (90, 3, "Helpfulness")
    project.refresh_from_db()
    assert (project.lease_seconds, project.k, project.allow_ties) == (90, 3, True)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": None}, "name"),
        ({"name": "  "}, "name"),
        ({"k": 10}, "k"),
        ({"annotations_per_item": 51}, "annotations_per_item"),
        ({"lease_seconds": 10**30}, "lease_seconds"),
        ({"lease_seconds": 5}, "lease_seconds"),
    ],
)
def test_the_api_names_the_field_it_refuses(project, admin_user, body, field):
    response = Api(admin_user).call("patch", f"/projects/{project.pk}", body)
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field


def test_more_labelers_per_item_send_ranked_items_back_to_the_queue(
    project, admin_user, labeler, make_items
):
    items = make_items(project, 2)
    lease = services.assignment_next(project=project, user=labeler)
    services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
    )
    assert Item.objects.get(pk=lease.item_id).is_complete
    services.project_update(project=project, annotations_per_item=2)
    assert not Item.objects.filter(pk__in=[i.pk for i in items], is_complete=True).exists()
    services.project_update(project=project, annotations_per_item=1)
    assert Item.objects.get(pk=lease.item_id).is_complete


def test_only_the_projects_admins_reach_its_settings(project, labeler, outsider):
    url = reverse("labeling:project_settings", args=[project.pk])
    for user in (labeler, outsider):
        assert _client(user).get(url).status_code == 404
        assert _client(user).post(url, {"name": "x"}).status_code == 404
        response = Api(user).call("patch", f"/projects/{project.pk}", {"name": "taken over"})
        assert response.status_code == 404
    project.refresh_from_db()
    assert project.name == "Helpfulness"


def test_settings_writes_need_the_csrf_token(project, admin_user):
    client = _client(admin_user, csrf=True)
    url = reverse("labeling:project_settings", args=[project.pk])
    assert client.post(url, _settings_form(project, name="x")).status_code == 403
    api = client.patch(
        f"/api/projects/{project.pk}", json.dumps({"name": "x"}), content_type="application/json"
    )
    assert api.status_code == 403
    project.refresh_from_db()
    assert project.name == "Helpfulness"
    assert Membership.objects.filter(project=project).count() == 2
