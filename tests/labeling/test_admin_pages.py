"""What a project's admin does without the Django admin: edit the settings, remove members,
create users and invite them with one-time links; pages and API, scoped and CSRF-protected."""

import json
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from labeling import services
from labeling.auth import api_token_create, token_hash
from labeling.models import Assignment, Flag, Invite, Item, Membership, Ranking

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


@pytest.mark.parametrize("lease", [0, -1, 29, 10**12])
def test_the_settings_page_and_the_api_refuse_a_lease_by_the_same_rule(
    project, admin_client, admin_user, lease
):
    """One rule, the service's: at least 30 seconds, with its message, on the page and in
    the API alike (the page's field must not bring the model's own "at least 0" bound)."""
    message = f"A lease must last from 30 seconds to 30 days (2592000 seconds), not {lease}."
    url = reverse("labeling:project_settings", args=[project.pk])
    page = admin_client.post(url, _settings_form(project, lease_seconds=lease))
    assert page.status_code == 200
    assert page.context["form"].errors == {"lease_seconds": [message]}
    api = Api(admin_user).call("patch", f"/projects/{project.pk}", {"lease_seconds": lease})
    assert api.status_code == 400
    assert (api.json()["field"], api.json()["detail"]) == ("lease_seconds", message)
    project.refresh_from_db()
    assert project.lease_seconds == 1800
    admin_user.is_staff = True  # staff may create projects: the same rule there
    admin_user.save(update_fields=["is_staff"])
    created = admin_client.post(
        reverse("labeling:project_create"), _settings_form(project, name="New", lease_seconds=lease)
    )
    assert created.status_code == 200
    assert created.context["form"].errors == {"lease_seconds": [message]}


def test_the_lease_field_tells_the_browser_the_services_bounds(project, admin_client):
    page = admin_client.get(reverse("labeling:project_settings", args=[project.pk]))
    field = page.context["form"]["lease_seconds"]
    assert 'min="30"' in str(field) and 'max="2592000"' in str(field)
    assert 'value="1800"' in str(field)
    assert "30 seconds to 30 days" in page.content.decode()


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
        ({"instructions": "nul \x00 byte"}, "instructions"),
        ({"k": True}, None),  # a boolean is no number (pydantic's 422)
    ],
)
def test_the_api_names_the_field_it_refuses(project, admin_user, body, field):
    response = Api(admin_user).call("patch", f"/projects/{project.pk}", body)
    if field is None:
        assert response.status_code == 422, response.content
        return
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


# --------------------------------------------------------------------------- members


def test_an_admin_removes_a_member_whose_leases_end_and_rankings_stay(
    project, admin_client, labeler, make_items
):
    make_items(project, 2)
    ranked = services.assignment_next(project=project, user=labeler)
    services.ranking_submit(
        user=labeler, item_id=ranked.item_id, groups=[[c] for c in ranked.display_order]
    )
    held = services.assignment_next(project=project, user=labeler)
    people = admin_client.get(reverse("labeling:project_people", args=[project.pk]))
    assert people.status_code == 200 and b"bob-labeler" in people.content
    response = admin_client.post(
        reverse("labeling:member_remove", args=[project.pk, labeler.pk]), follow=True
    )
    assert b"no longer a member" in response.content
    assert not Membership.objects.filter(project=project, user=labeler).exists()
    assert Assignment.objects.get(pk=held.pk).status == Assignment.Status.EXPIRED
    assert Ranking.objects.filter(user=labeler).count() == 1
    assert _client(labeler).get(reverse("labeling:label", args=[project.pk])).status_code == 404


def test_the_api_lists_adds_and_removes_members(project, admin_user, labeler, make_user):
    api = Api(admin_user)
    make_user("carol")
    added = api.call("post", f"/projects/{project.pk}/members", {"username": "carol"})
    assert added.status_code == 200 and added.json()["role"] == "labeler"
    names = {m["username"] for m in api.call("get", f"/projects/{project.pk}/members").json()}
    assert names == {"alice-admin", "bob-labeler", "carol"}
    assert api.call("delete", f"/projects/{project.pk}/members/{labeler.pk}").status_code == 204
    gone = api.call("delete", f"/projects/{project.pk}/members/{labeler.pk}")
    assert gone.status_code == 404 and gone.json()["code"] == "member_not_found"
    unknown = api.call("post", f"/projects/{project.pk}/members", {"username": "nobody"})
    assert unknown.status_code == 400 and "nobody" in unknown.json()["detail"]


def test_the_last_admin_cannot_be_removed(project, admin_user, admin_client):
    refused = Api(admin_user).call("delete", f"/projects/{project.pk}/members/{admin_user.pk}")
    assert refused.status_code == 400 and "last admin" in refused.json()["detail"]
    admin_client.post(reverse("labeling:member_remove", args=[project.pk, admin_user.pk]))
    assert Membership.objects.filter(project=project, user=admin_user, role="admin").exists()


def test_only_admins_manage_people(project, labeler, outsider, admin_user):
    for user in (labeler, outsider):
        client = _client(user)
        assert client.get(reverse("labeling:project_people", args=[project.pk])).status_code == 404
        url = reverse("labeling:member_remove", args=[project.pk, admin_user.pk])
        assert client.post(url).status_code == 404
        url = reverse("labeling:invite_create", args=[project.pk])
        assert client.post(url, {"role": "admin", "days": 7}).status_code == 404
        api = Api(user)
        assert api.call("get", f"/projects/{project.pk}/members").status_code == 404
        assert api.call("post", f"/projects/{project.pk}/invites", {}).status_code == 404
        body = {"username": "sneaky", "password": "a long passphrase 42", "role": "admin"}
        assert api.call("post", f"/projects/{project.pk}/users", body).status_code == 404
    assert Membership.objects.filter(project=project).count() == 2
    assert not Invite.objects.exists()


def test_people_writes_need_the_csrf_token(project, admin_user, labeler):
    client = _client(admin_user, csrf=True)
    for name, args, data in [
        ("member_remove", [project.pk, labeler.pk], {}),
        ("invite_create", [project.pk], {"role": "labeler", "days": 7}),
        ("user_create", [project.pk], {"username": "x1", "password": "pw", "role": "labeler"}),
    ]:
        assert client.post(reverse(f"labeling:{name}", args=args), data).status_code == 403
    assert Membership.objects.filter(project=project, user=labeler).exists()
    assert not Invite.objects.exists()


# --------------------------------------------------------------------------- accounts and invites


def test_an_admin_creates_an_account_that_can_log_in(project, admin_client, django_user_model):
    url = reverse("labeling:user_create", args=[project.pk])
    weak = admin_client.post(url, {"username": "dave", "password": "123", "role": "labeler"})
    assert weak.status_code == 200 and not django_user_model.objects.filter(username="dave")
    admin_client.post(
        url, {"username": "dave", "password": "a long passphrase 42", "role": "admin"}
    )
    assert Membership.objects.get(project=project, user__username="dave").role == "admin"
    assert Client().login(username="dave", password="a long passphrase 42")
    taken = Api(project.created_by).call(
        "post",
        f"/projects/{project.pk}/users",
        {"username": "DAVE", "password": "a long passphrase 42"},
    )
    assert taken.status_code == 400 and taken.json()["field"] == "username"


def test_a_refused_account_keeps_the_typed_username_and_shows_errors_on_the_fields(
    project, admin_client, django_user_model
):
    url = reverse("labeling:user_create", args=[project.pk])
    typed = {"username": "dave", "password": "123", "role": "labeler"}
    page = admin_client.post(url, typed)
    assert page.status_code == 200 and not django_user_model.objects.filter(username="dave")
    form = page.context["user_form"]
    assert set(form.errors) == {"password"} and "too short" in " ".join(form.errors["password"])
    html = page.content.decode()
    start = html.index('id="user-create-form"')
    user_form_html = html[start : html.index("</form>", start)]
    assert 'value="dave"' in user_form_html  # the username is kept...
    assert 'value="123"' not in html  # ...the password never is
    assert "too short" in user_form_html  # the error is on the form, by its field
    assert not list(page.context["messages"])  # not in a message at the top of the page
    # a taken username: the error sits on the username field
    taken = admin_client.post(
        url,
        {
            "username": project.created_by.username,
            "password": "a long passphrase 42",
            "role": "labeler",
        },
    )
    assert taken.status_code == 200 and set(taken.context["user_form"].errors) == {"username"}
    assert "a long passphrase 42" not in taken.content.decode()


def test_an_invite_link_makes_one_account_and_joins_the_project(project, admin_client):
    admin_client.post(
        reverse("labeling:invite_create", args=[project.pk]), {"role": "labeler", "days": 3}
    )
    invite = Invite.objects.get()
    assert len(invite.token_hash) == 64 and invite.used_at is None
    page = admin_client.get(reverse("labeling:project_people", args=[project.pk]))
    url = page.context["new_invite"]["url"]
    assert invite.token_hash == token_hash(url.rstrip("/").rsplit("/", 1)[1])
    again = admin_client.get(reverse("labeling:project_people", args=[project.pk]))
    assert again.context["new_invite"] is None  # shown once

    newcomer = Client(enforce_csrf_checks=False)
    path = url.split("testserver", 1)[1]
    form = newcomer.get(path)
    assert form.status_code == 200 and b"Join Helpfulness" in form.content
    mismatch = newcomer.post(
        path, {"username": "erin", "password1": "a long passphrase 42", "password2": "other"}
    )
    assert mismatch.status_code == 200 and "password2" in mismatch.context["form"].errors
    joined = newcomer.post(
        path,
        {
            "username": "erin",
            "password1": "a long passphrase 42",
            "password2": "a long passphrase 42",
        },
    )
    assert joined.status_code == 302 and joined.url == reverse("labeling:label", args=[project.pk])
    assert Membership.objects.get(project=project, user__username="erin").role == "labeler"
    assert newcomer.get(joined.url).status_code == 200  # logged in
    # single use
    reused = Client().post(
        path,
        {
            "username": "frank",
            "password1": "a long passphrase 42",
            "password2": "a long passphrase 42",
        },
    )
    assert reused.status_code == 404 and b"not valid" in reused.content
    assert not Membership.objects.filter(user__username="frank").exists()


def test_an_expired_or_revoked_invite_is_refused(project, admin_user):
    api = Api(admin_user)
    created = api.call("post", f"/projects/{project.pk}/invites", {"role": "admin", "days": 1})
    assert created.status_code == 201
    token = created.json()["token"]
    Invite.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    body = {"token": token, "username": "gina", "password": "a long passphrase 42"}
    expired = Client().post(
        "/api/invites/accept", json.dumps(body), content_type="application/json"
    )
    assert expired.status_code == 404 and expired.json()["code"] == "invite_not_found"
    assert Client().get(reverse("invite_accept", args=[token])).status_code == 404

    second = api.call("post", f"/projects/{project.pk}/invites", {"role": "admin"}).json()
    listed = api.call("get", f"/projects/{project.pk}/invites").json()
    assert [i["id"] for i in listed] == [second["id"]] and "token" not in listed[0]
    assert api.call("delete", f"/projects/{project.pk}/invites/{second['id']}").status_code == 204
    body["token"] = second["token"]
    revoked = Client().post(
        "/api/invites/accept", json.dumps(body), content_type="application/json"
    )
    assert revoked.status_code == 404
    assert not Membership.objects.filter(user__username="gina").exists()


def test_the_api_accepts_an_invite_once(project, admin_user):
    api = Api(admin_user)
    token = api.call("post", f"/projects/{project.pk}/invites", {"role": "admin"}).json()["token"]
    body = {"token": token, "username": "hank", "password": "short"}
    weak = Client().post("/api/invites/accept", json.dumps(body), content_type="application/json")
    assert weak.status_code == 400 and weak.json()["field"] == "password"
    body["password"] = "a long passphrase 42"
    ok = Client().post("/api/invites/accept", json.dumps(body), content_type="application/json")
    assert ok.status_code == 201 and ok.json()["role"] == "admin"
    body["username"] = "ivan"
    again = Client().post("/api/invites/accept", json.dumps(body), content_type="application/json")
    assert again.status_code == 404
    bad_days = api.call("post", f"/projects/{project.pk}/invites", {"days": 0})
    assert bad_days.status_code == 400 and bad_days.json()["field"] == "days"
    bad_role = api.call("post", f"/projects/{project.pk}/invites", {"role": "owner"})
    assert bad_role.status_code == 400 and bad_role.json()["field"] == "role"


# --------------------------------------------------------------------------- flag categories


def _leased(project, user):
    return services.assignment_next(project=project, user=user)


def test_a_flag_has_a_preset_category_and_optional_details(project, labeler, make_items):
    make_items(project, 3)
    flag = services.item_flag(
        user=labeler, item_id=_leased(project, labeler).item_id, category="wrong_language"
    )
    assert (flag.category, flag.reason) == ("wrong_language", "")
    with pytest.raises(services.LabelingError, match="Say what is wrong") as refused:
        services.item_flag(user=labeler, item_id=_leased(project, labeler).item_id, reason=" ")
    assert refused.value.field == "reason"
    with pytest.raises(services.LabelingError, match="Unknown flag category") as refused:
        services.item_flag(user=labeler, item_id=_leased(project, labeler).item_id, category="x")
    assert refused.value.field == "category"
    other = services.item_flag(
        user=labeler, item_id=_leased(project, labeler).item_id, reason="prompt is cut off"
    )
    assert (other.category, other.reason) == ("other", "prompt is cut off")


def test_the_page_and_the_api_flag_with_a_category(project, labeler, make_items):
    make_items(project, 3)
    client = _client(labeler)
    page = client.get(reverse("labeling:label", args=[project.pk]))
    assert b'name="flag-category" value="unsafe"' in page.content
    item_id = page.context["item"].pk
    url = reverse("labeling:item_flag", args=[project.pk, item_id])
    body = json.dumps({"category": "unsafe", "reason": "asks for a weapon recipe"})
    assert client.post(url, body, content_type="application/json").status_code == 200
    assert Flag.objects.get(item_id=item_id).category == "unsafe"
    api = Api(labeler)
    nxt = _leased(project, labeler)
    refused = api.call("post", f"/items/{nxt.item_id}/flag", {"category": "meh"})
    assert refused.status_code == 400 and refused.json()["field"] == "category"
    ok = api.call("post", f"/items/{nxt.item_id}/flag", {"category": "spam"})
    assert ok.status_code == 200 and ok.json()["category"] == "spam"


def test_the_dashboard_and_the_api_group_open_flags_by_category(
    project, admin_user, admin_client, labeler, make_user, make_items
):
    make_items(project, 3)
    project.annotations_per_item = 3
    project.save()
    other = make_user("carol")
    services.membership_set(project=project, user=other, role="labeler")
    services.item_flag(user=labeler, item_id=_leased(project, labeler).item_id, category="spam")
    services.item_flag(user=other, item_id=_leased(project, other).item_id, category="spam")
    services.item_flag(user=labeler, item_id=_leased(project, labeler).item_id, category="broken")
    page = admin_client.get(reverse("labeling:project_dashboard", args=[project.pk]))
    assert [(c["category"], c["count"]) for c in page.context["flag_counts"]] == [
        ("spam", 2),
        ("broken", 1),
    ]
    assert b'id="flag-counts"' in page.content and b"Spam or gibberish" in page.content
    api = Api(admin_user)
    listed = api.call("get", f"/projects/{project.pk}/flags?category=spam").json()
    assert len(listed["flags"]) == 2 and listed["categories"][0] == {
        "category": "spam",
        "label": "Spam or gibberish",
        "count": 2,
    }
    assert Api(labeler).call("get", f"/projects/{project.pk}/flags").status_code == 404


def test_an_admin_who_leaves_or_steps_down_takes_their_open_invites_with_them(
    project, admin_user, make_user
):
    second = make_user("carol-admin")
    services.membership_set(project=project, user=second, role=Membership.Role.ADMIN)
    services.invite_create(project=project, role="admin", created_by=second)
    services.invite_create(project=project, role="labeler", created_by=admin_user)
    services.membership_set(project=project, user=second, role=Membership.Role.LABELER)
    assert list(Invite.objects.filter(project=project).values_list("created_by", flat=True)) == [
        admin_user.pk
    ]
    services.membership_set(project=project, user=second, role=Membership.Role.ADMIN)
    services.invite_create(project=project, role="admin", created_by=second)
    services.membership_remove(project=project, user_id=second.pk)
    assert not Invite.objects.filter(project=project, created_by=second).exists()


def test_the_last_admin_cannot_step_down_to_labeler(project, admin_user):
    with pytest.raises(services.LabelingError, match="last admin"):
        services.membership_set(project=project, user=admin_user, role=Membership.Role.LABELER)
    assert Membership.objects.get(project=project, user=admin_user).role == Membership.Role.ADMIN
