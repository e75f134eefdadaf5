"""The JSON API at /api/ (labeling.api): scoping, token and session auth, CSRF, import/export."""

import io
import json

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils.crypto import get_random_string

from labeling import services
from labeling.auth import api_token_create, token_hash
from labeling.models import ApiToken, Assignment, Flag, Item, Prompt, Ranking

pytestmark = pytest.mark.django_db


class Api:
    """A test client speaking JSON with a bearer token (and no cookies, so no CSRF)."""

    def __init__(self, user):
        self.client = Client(enforce_csrf_checks=True)
        self.headers = {"Authorization": f"Bearer {api_token_create(user=user)}"}

    def get(self, path, **params):
        return self.client.get(f"/api{path}", params, headers=self.headers)

    def post(self, path, body=None):
        data = json.dumps(body) if body is not None else ""
        return self.client.post(
            f"/api{path}", data, content_type="application/json", headers=self.headers
        )


def test_openapi_schema_and_docs_are_served(client):
    schema = client.get("/api/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in (
        "/api/projects",
        "/api/projects/{project_id}/next",
        "/api/items/{item_id}/ranking",
        "/api/items/{item_id}/skip",
        "/api/items/{item_id}/flag",
        "/api/projects/{project_id}/import",
        "/api/projects/{project_id}/export",
        "/api/tokens",
    ):
        assert path in paths
    assert client.get("/api/docs").status_code == 200


def test_requests_without_credentials_are_401(project, client):
    refused = client.get("/api/projects")
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    bad = Client().get("/api/projects", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401


def test_project_list_shows_only_the_callers_projects(project, admin_user, labeler, outsider):
    other = services.project_create(name="Someone else's", created_by=outsider)
    names = [p["name"] for p in Api(labeler).get("/projects").json()]
    assert names == ["Helpfulness"]
    mine = Api(outsider).get("/projects").json()
    assert [p["id"] for p in mine] == [other.pk] and mine[0]["role"] == "admin"
    detail = Api(labeler).get(f"/projects/{project.pk}").json()
    assert (detail["role"], detail["is_admin"], detail["k"]) == ("labeler", False, 4)


def test_a_foreign_project_and_its_items_are_404(project, outsider, make_items):
    item = make_items(project, 1)[0]
    api = Api(outsider)
    assert api.get(f"/projects/{project.pk}").status_code == 404
    assert api.post(f"/projects/{project.pk}/next").status_code == 404
    ids = list(item.item_completions.values_list("completion_id", flat=True))
    assert api.post(f"/items/{item.pk}/ranking", {"groups": [ids]}).status_code == 404
    assert api.post(f"/items/{item.pk}/skip").status_code == 404
    assert api.post(f"/items/{item.pk}/flag", {"reason": "spam"}).status_code == 404
    assert api.get(f"/projects/{project.pk}/export").status_code == 404
    assert api.post("/items/999999/skip").status_code == 404
    assert (
        not Ranking.objects.exists()
        and not Flag.objects.exists()
        and not Assignment.objects.exists()
    )


def test_a_labeler_ranks_skips_and_flags_with_a_token(project, labeler, make_items):
    first, second, third = make_items(project, 3)
    api = Api(labeler)

    got = api.post(f"/projects/{project.pk}/next", {"html": True}).json()["item"]
    assert got["id"] == first.pk
    lease = Assignment.objects.get(item=first, user=labeler)
    assert [c["id"] for c in got["completions"]] == lease.display_order == got["display_order"]
    assert got["prompt"]["text"] == first.prompt.text and got["prompt"]["html"].startswith("<p>")
    # Reloading gives the same lease back.
    assert api.post(f"/projects/{project.pk}/next").json()["item"]["id"] == first.pk

    shown = got["display_order"]
    body = {
        "groups": [[shown[1]], [shown[0], shown[2]], [shown[3]]],
        "rationale": "b",
        "seconds_spent": 4.5,
    }
    stored = api.post(f"/items/{first.pk}/ranking", body)
    assert stored.status_code == 200, stored.content
    assert stored.json()["groups"] == body["groups"]
    again = api.post(f"/items/{first.pk}/ranking", body)  # a double submit stores one ranking
    assert again.json()["id"] == stored.json()["id"]
    ranking = Ranking.objects.get(item=first, user=labeler)
    assert (ranking.groups, ranking.seconds_spent, ranking.display_order) == (
        body["groups"],
        4.5,
        shown,
    )

    assert api.post(f"/projects/{project.pk}/next").json()["item"]["id"] == second.pk
    skipped = api.post(f"/items/{second.pk}/skip")
    assert skipped.status_code == 200 and skipped.json()["status"] == "skipped"
    assert api.post(f"/projects/{project.pk}/next").json()["item"]["id"] == third.pk
    flagged = api.post(f"/items/{third.pk}/flag", {"reason": "prompt is nonsense"})
    assert flagged.status_code == 200
    assert Flag.objects.get(item=third).reason == "prompt is nonsense"
    assert api.post(f"/projects/{project.pk}/next").json() == {"item": None}


def test_bad_rankings_get_clear_errors(project, labeler, make_items):
    first, second = make_items(project, 2)
    api = Api(labeler)
    shown = api.post(f"/projects/{project.pk}/next").json()["item"]["display_order"]
    missing = api.post(
        f"/items/{first.pk}/ranking", {"groups": [[shown[0]], [shown[1]], [shown[2]]]}
    )
    assert missing.status_code == 400
    assert missing.json()["code"] == "invalid_ranking" and "leaves out" in missing.json()["detail"]
    malformed = api.post(f"/items/{first.pk}/ranking", {"groups": "first"})
    assert malformed.status_code == 422
    not_leased = api.post(f"/items/{second.pk}/ranking", {"groups": [[1], [2]]})
    assert not_leased.status_code == 409 and not_leased.json()["code"] == "not_assigned"
    assert not Ranking.objects.exists()


def test_session_posts_need_the_csrf_token_and_token_posts_do_not(project, labeler, make_items):
    make_items(project, 2)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(labeler)
    url = f"/api/projects/{project.pk}/next"
    assert browser.get("/api/projects").status_code == 200  # safe methods need no token
    refused = browser.post(url, "{}", content_type="application/json")
    assert refused.status_code == 403
    assert not Assignment.objects.exists()
    secret = get_random_string(32)
    browser.cookies["csrftoken"] = secret
    accepted = browser.post(
        url, "{}", content_type="application/json", headers={"X-CSRFToken": secret}
    )
    assert accepted.status_code == 200 and accepted.json()["item"] is not None
    # A bearer token needs no CSRF token: no cookie is involved.
    assert Api(labeler).post(f"/projects/{project.pk}/next").status_code == 200


def test_tokens_are_created_by_the_session_shown_once_and_stored_hashed(labeler, project):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(labeler)
    secret = get_random_string(32)
    browser.cookies["csrftoken"] = secret
    response = browser.post(
        "/api/tokens",
        json.dumps({"name": "my script"}),
        content_type="application/json",
        headers={"X-CSRFToken": secret},
    )
    assert response.status_code == 201
    raw = response.json()["token"]
    row = ApiToken.objects.get(user=labeler)
    assert row.name == "my script" and row.key_hash == token_hash(raw) and raw not in row.key_hash
    projects = Client().get("/api/projects", headers={"Authorization": f"Bearer {raw}"})
    assert projects.status_code == 200 and len(projects.json()) == 1
    # A token cannot mint more tokens; the session without CSRF cannot either.
    refused = Api(labeler).post("/tokens", {})
    assert refused.status_code == 403 and refused.json()["code"] == "session_required"
    assert browser.post("/api/tokens", "{}", content_type="application/json").status_code == 403
    assert ApiToken.objects.filter(user=labeler).count() == 2  # the one above and Api()'s own


def test_admins_import_and_export_streamed_jsonl(project, admin_user, labeler):
    api = Api(admin_user)
    url = f"/api/projects/{project.pk}/import"
    good = b'{"prompt": "p", "chosen": "yes ", "rejected": "no"}\n'
    upload = io.BytesIO(good)
    upload.name = "prefs.jsonl"
    response = api.client.post(url, {"file": upload}, headers=api.headers)
    assert response.status_code == 200, response.content
    assert response.json() == {
        "format": "jsonl",
        "records": 1,
        "prompts": 1,
        "completions": 2,
        "items": 1,
        "rankings": 1,
    }

    bad = io.BytesIO(b"prompt,chosen,rejected\nq,a,b\nq,a\n")
    bad.name = "bad.csv"
    refused = api.client.post(url, {"file": bad, "fmt": "csv"}, headers=api.headers)
    assert refused.status_code == 400
    assert refused.json()["line"] == 3 and "expected 3 fields" in refused.json()["detail"]
    assert Prompt.objects.filter(project=project).count() == 1

    export = api.get(f"/projects/{project.pk}/export", kind="pairs")
    assert export.status_code == 200 and export.streaming
    assert export["Content-Type"].startswith("application/jsonl")
    assert (
        b"".join(export.streaming_content)
        == b'{"prompt": "p", "chosen": "yes ", "rejected": "no"}\n'
    )
    hh = api.get(f"/projects/{project.pk}/export", kind="rankings", consensus="1")
    rows = [json.loads(line) for line in b"".join(hh.streaming_content).splitlines()]
    assert [r["source"] for r in rows] == ["consensus"]
    assert api.get(f"/projects/{project.pk}/export", kind="everything").status_code == 400

    # A labeler of the project is not an admin of it: import and export are 404 to them.
    upload.seek(0)
    assert (
        Api(labeler).client.post(url, {"file": upload}, headers=Api(labeler).headers).status_code
        == 404
    )
    assert Api(labeler).get(f"/projects/{project.pk}/export").status_code == 404
    assert Item.objects.filter(project=project).count() == 1


def test_create_api_token_command_prints_a_working_token(labeler, capsys):
    call_command("create_api_token", labeler.username)
    raw = capsys.readouterr().out.strip()
    assert ApiToken.objects.get(user=labeler).key_hash == token_hash(raw)
    assert (
        Client().get("/api/projects", headers={"Authorization": f"Bearer {raw}"}).status_code == 200
    )


def test_token_use_is_recorded_at_most_once_a_minute(labeler, project):
    api = Api(labeler)
    row = ApiToken.objects.get(user=labeler)
    assert row.last_used_at is None
    api.get("/projects")
    first = ApiToken.objects.get(pk=row.pk).last_used_at
    assert first is not None
    api.get("/projects")
    assert ApiToken.objects.get(pk=row.pk).last_used_at == first


def test_a_large_upload_is_imported_from_its_temporary_file(project, admin_user, settings):
    api = Api(admin_user)
    data = b"".join(b'{"prompt": "prompt number %d %s"}\n' % (i, b"x" * 80) for i in range(30_000))
    assert len(data) > settings.FILE_UPLOAD_MAX_MEMORY_SIZE  # so Django spools it to disk
    upload = io.BytesIO(data)
    upload.name = "many.jsonl"
    response = api.client.post(
        f"/api/projects/{project.pk}/import", {"file": upload}, headers=api.headers
    )
    assert response.status_code == 200, response.content
    assert response.json()["prompts"] == 30_000
    assert Prompt.objects.filter(project=project).count() == 30_000


HUGE = 10**20  # beyond a 64-bit integer: the database driver would overflow on it


def test_ids_beyond_64_bits_are_not_found_or_refused_never_a_server_error(
    project, labeler, make_items
):
    (item,) = make_items(project, 1)
    api = Api(labeler)
    for path in (f"/projects/{HUGE}", f"/projects/{HUGE}/export"):
        response = api.get(path)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "No such project.", "code": "not_found"}
    for path in (f"/projects/{HUGE}/next", f"/items/{HUGE}/skip", f"/items/{HUGE}/ranking"):
        assert api.post(path, {"groups": [[1]]}).status_code == 404, path
    assert api.post(f"/projects/{project.pk}/next", {"exclude_item_id": HUGE}).status_code == 422
    lease = api.post(f"/projects/{project.pk}/next").json()["item"]
    shown = lease["display_order"]
    response = api.post(f"/items/{item.pk}/ranking", {"groups": [[HUGE], shown]})
    assert response.status_code == 422 and not Ranking.objects.exists()


def test_a_json_true_is_not_the_id_1(project, labeler, make_items):
    (item,) = make_items(project, 1)
    api = Api(labeler)
    shown = api.post(f"/projects/{project.pk}/next").json()["item"]["display_order"]
    groups = [[True], *[[c] for c in shown]]  # lax parsing would have made it the id 1
    assert api.post(f"/items/{item.pk}/ranking", {"groups": groups}).status_code == 422
    assert not Ranking.objects.exists()


def test_pages_with_ids_beyond_64_bits_are_404(project, labeler):
    client = Client()
    client.force_login(labeler)
    assert client.get(f"/projects/{HUGE}/").status_code == 404
    assert client.get(f"/projects/{HUGE}/label/").status_code == 404
    response = client.post(
        f"/projects/{project.pk}/label/next/",
        json.dumps({"after": HUGE}),
        content_type="application/json",
    )
    assert response.status_code == 400 and response.json()["code"] == "invalid"


def test_people_list_and_revoke_their_own_tokens_only(labeler, outsider):
    mine, theirs = Api(labeler), Api(outsider)
    listed = mine.get("/tokens").json()
    assert len(listed) == 1 and "token" not in listed[0] and listed[0]["last_used_at"]
    other_id = theirs.get("/tokens").json()[0]["id"]
    assert mine.client.delete(f"/api/tokens/{other_id}", headers=mine.headers).status_code == 404
    assert theirs.get("/projects").status_code == 200  # untouched
    own_id = listed[0]["id"]
    assert mine.client.delete(f"/api/tokens/{own_id}", headers=mine.headers).status_code == 204
    assert mine.get("/projects").status_code == 401  # a revoked token is refused at once
    assert not ApiToken.objects.filter(pk=own_id).exists()


def test_the_tokens_page_shows_a_new_token_once_and_revokes_with_csrf(labeler, outsider):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(labeler)
    page = browser.get("/account/tokens/")
    assert page.status_code == 200 and 'id="no-tokens"' in page.content.decode()
    csrf = page.cookies["csrftoken"].value
    assert browser.post("/account/tokens/", {"name": "x"}).status_code == 403  # no CSRF token
    created = browser.post(
        "/account/tokens/", {"name": "import script", "csrfmiddlewaretoken": csrf}
    )
    assert created.status_code == 302  # a reload of the page that follows creates nothing
    shown = browser.get("/account/tokens/")
    assert "no-store" in shown["Cache-Control"]
    html = shown.content.decode()
    raw = html.split('id="new-token-value">')[1].split("<")[0]
    token = ApiToken.objects.get(user=labeler)
    assert token.key_hash == token_hash(raw) and token.name == "import script"
    assert raw not in browser.get("/account/tokens/").content.decode()  # shown once
    foreign = ApiToken.objects.get(key_hash=token_hash(api_token_create(user=outsider)))
    browser.post(
        "/account/tokens/",
        {"action": "revoke", "token_id": foreign.pk, "csrfmiddlewaretoken": csrf},
    )
    assert ApiToken.objects.filter(pk=foreign.pk).exists()
    response = browser.post(
        "/account/tokens/",
        {"action": "revoke", "token_id": token.pk, "csrfmiddlewaretoken": csrf},
    )
    assert response.status_code == 302 and not ApiToken.objects.filter(user=labeler).exists()


# --------------------------------------------------------------------------- bad imports


PROBES = {
    "deep.jsonl": b'{"prompt": "p", "metadata": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
    "digits.jsonl": b'{"prompt": "p", "n": ' + b"9" * 5000 + b"}",
    "nan.jsonl": b'{"prompt": "p", "metadata": {"s": NaN}}',
    "inf.jsonl": b'{"prompt": "p", "metadata": {"s": Infinity}}',
    "-inf.jsonl": b'{"prompt": "p", "metadata": {"s": -Infinity}}',
    "same.jsonl": b'{"prompt": "p", "chosen": "x", "rejected": "x"}',
    "orphan.jsonl": b'{"prompt": "p", "completions": ["a", "b", "c", "d", "e"]}',
}


@pytest.mark.parametrize("name", PROBES)
def test_an_import_of_what_cannot_be_stored_is_a_400_naming_the_line_never_a_500(
    project, admin_user, name
):
    api = Api(admin_user)
    upload = io.BytesIO(b'{"prompt": "fine"}\n' + PROBES[name] + b"\n")
    upload.name = name
    refused = api.client.post(
        f"/api/projects/{project.pk}/import", {"file": upload}, headers=api.headers
    )
    assert refused.status_code == 400, refused.content
    body = refused.json()
    assert body["code"] == "bad_line" and body["line"] == 2
    assert body["detail"].startswith(f"{name}, line 2: ")
    assert "Nothing from this file was stored" in body["detail"]
    assert not Prompt.objects.filter(project=project).exists()


def test_an_import_over_import_max_bytes_is_a_413_naming_the_limit(project, admin_user, settings):
    settings.IMPORT_MAX_BYTES = 2048
    api = Api(admin_user)
    upload = io.BytesIO(b"".join(b'{"prompt": "p%d"}\n' % i for i in range(500)))
    upload.name = "big.jsonl"
    refused = api.client.post(
        f"/api/projects/{project.pk}/import", {"file": upload}, headers=api.headers
    )
    assert refused.status_code == 413
    assert refused.json()["code"] == "too_large"
    assert "over the import limit of 2 KiB (IMPORT_MAX_BYTES)" in refused.json()["detail"]
    assert not Prompt.objects.filter(project=project).exists()


def test_wait_for_k_is_a_form_field_of_the_import(project, admin_user):
    api = Api(admin_user)
    upload = io.BytesIO(b'{"prompt": "p", "completions": ["a", "b", "c", "d", "e"]}\n')
    upload.name = "five.jsonl"
    response = api.client.post(
        f"/api/projects/{project.pk}/import",
        {"file": upload, "wait_for_k": "true"},
        headers=api.headers,
    )
    assert response.status_code == 200, response.content
    assert (response.json()["completions"], response.json()["items"]) == (5, 1)


# --------------------------------------------------------------------------- the schema


def test_every_operation_that_takes_input_declares_its_422(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    takes_input = []
    for path, operations in paths.items():
        for method, operation in operations.items():
            if operation.get("parameters") or operation.get("requestBody"):
                takes_input.append((method, path))
                assert "422" in operation["responses"], (method, path)
                detail = operation["responses"]["422"]["content"]["application/json"]["schema"]
                assert detail  # a schema, not a bare description
    assert ("post", "/api/projects/{project_id}/import") in takes_input
    assert ("post", "/api/training/jobs") in takes_input
    assert len(takes_input) >= 15
    imports = paths["/api/projects/{project_id}/import"]["post"]["responses"]
    assert {"400", "404", "413", "422"} <= set(imports)


def test_a_malformed_request_is_the_422_the_schema_declares(project, admin_user):
    api = Api(admin_user)
    refused = api.get("/projects/not-a-number")
    assert refused.status_code == 422
    assert isinstance(refused.json()["detail"], list)
    refused = api.get(f"/projects/{project.pk}/export", consensus="maybe")
    assert refused.status_code == 422
