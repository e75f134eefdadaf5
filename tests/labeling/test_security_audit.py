"""Security audit regressions for the labeling app: login throttling on every login page,
leases that belong to someone else, session vs token API auth, and import abuse."""

import io
import json
from html.parser import HTMLParser

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from labeling import importexport, services
from labeling.auth import api_token_create
from labeling.forms import _throttle_key
from labeling.importexport import ImportFileError, import_file
from labeling.models import ApiToken, Membership, Prompt, Ranking
from labeling.templatetags.labeling_markdown import markdown_to_safe_html

pytestmark = pytest.mark.django_db

IPS = ("10.9.0.1", "10.9.0.2")
NAMES = ("audit-staff", "AUDIT-STAFF", "Audit-Staff", "audit-case")


@pytest.fixture
def throttle(settings):
    settings.LOGIN_THROTTLE_ATTEMPTS = 3
    settings.LOGIN_THROTTLE_WINDOW_S = 300
    keys = [_throttle_key(u, ip) for u in NAMES for ip in IPS]
    cache.delete_many(keys)
    yield
    cache.delete_many(keys)


def test_the_django_admin_login_page_is_throttled_too(client, make_user, throttle):
    make_user("audit-staff", password="right-horse-battery", is_staff=True)
    url = reverse("admin:login")
    for _ in range(3):
        r = client.post(url, {"username": "audit-staff", "password": "wrong"}, REMOTE_ADDR=IPS[0])
        assert r.status_code == 200
    r = client.post(
        url, {"username": "audit-staff", "password": "right-horse-battery"}, REMOTE_ADDR=IPS[0]
    )
    assert r.status_code == 200 and "Too many failed login attempts" in r.content.decode()
    assert "_auth_user_id" not in client.session


def test_failures_on_the_admin_login_count_on_the_site_login(client, make_user, throttle):
    make_user("audit-staff", password="right-horse-battery", is_staff=True)
    for _ in range(3):
        client.post(
            reverse("admin:login"),
            {"username": "audit-staff", "password": "wrong"},
            REMOTE_ADDR=IPS[0],
        )
    r = client.post(
        reverse("login"),
        {"username": "audit-staff", "password": "right-horse-battery"},
        REMOTE_ADDR=IPS[0],
    )
    assert r.status_code == 200 and "Too many failed login attempts" in r.content.decode()


def test_varying_the_case_of_the_username_does_not_reset_the_throttle(client, make_user, throttle):
    make_user("audit-case", password="right-horse-battery")
    for name in ("AUDIT-STAFF", "Audit-Staff", "audit-staff"):
        client.post(reverse("login"), {"username": name, "password": "x"}, REMOTE_ADDR=IPS[1])
    r = client.post(
        reverse("login"), {"username": "Audit-Staff", "password": "x"}, REMOTE_ADDR=IPS[1]
    )
    assert "Too many failed login attempts" in r.content.decode()


def test_an_inactive_user_is_refused_by_login_session_and_token(client, make_user, project):
    user = make_user("gone", password="right-horse-battery")
    services.membership_set(project=project, user=user, role=Membership.Role.LABELER)
    raw = api_token_create(user=user)
    session = Client()
    session.force_login(user)
    user.is_active = False
    user.save()
    r = client.post(reverse("login"), {"username": "gone", "password": "right-horse-battery"})
    assert r.status_code == 200 and "_auth_user_id" not in client.session
    assert session.get("/api/projects").status_code == 401
    assert client.get("/api/projects", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401
    assert session.get(reverse("labeling:label", args=[project.pk])).status_code == 302


def test_a_member_cannot_rank_skip_or_submit_over_another_labelers_lease(
    project, admin_user, labeler, make_items
):
    (item,) = make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    assert lease.item_id == item.pk
    intruder = Client()
    intruder.force_login(admin_user)  # a member (even the admin) without the lease
    body = {"groups": [[c] for c in lease.display_order]}
    r = intruder.post(
        reverse("labeling:item_submit", args=[project.pk, item.pk]),
        json.dumps(body),
        content_type="application/json",
    )
    assert r.status_code == 409
    r = intruder.post(reverse("labeling:item_skip", args=[project.pk, item.pk]))
    assert r.status_code == 409
    assert not Ranking.objects.filter(item=item).exists()
    lease.refresh_from_db()
    assert lease.status == "active"


def test_an_invalid_bearer_token_falls_back_to_the_session_and_its_csrf_check(
    project, labeler, make_items
):
    make_items(project, 1)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(labeler)
    r = browser.post(
        f"/api/projects/{project.pk}/next",
        "{}",
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer not-a-real-token",
    )
    assert r.status_code == 403  # a made-up bearer header does not skip CSRF


def test_api_tokens_are_stored_only_as_a_hash(labeler):
    raw = api_token_create(user=labeler)
    row = ApiToken.objects.get(user=labeler)
    assert raw not in row.key_hash and len(row.key_hash) == 64


def test_a_huge_line_is_refused_before_it_is_read_whole(project, admin_user, monkeypatch):
    monkeypatch.setattr(importexport, "MAX_LINE_BYTES", 1024)
    big = b'{"prompt": "' + b"a" * 5000 + b'"}\n'
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=io.BytesIO(b'{"prompt": "ok"}\n' + big))
    assert err.value.line == 2 and "longer than" in str(err.value)
    assert not Prompt.objects.filter(project=project).exists()


def test_a_binary_upload_is_refused_with_a_line_number_and_stores_nothing(project, admin_user):
    blob = bytes(range(256)) * 64
    with pytest.raises(ImportFileError):
        import_file(project=project, fileobj=io.BytesIO(blob))
    assert not Prompt.objects.filter(project=project).exists()


class _TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))


@pytest.mark.parametrize(
    "payload",
    [
        "[x](javascript:alert(1))",
        "[x](JaVaScRiPt:alert(1))",
        "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
        "![x](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+)",
        "<svg onload=alert(1)>",
        "<style>body{display:none}</style>",
        "<iframe src=https://evil.example></iframe>",
        '<a href="javascript:alert(1)">x</a>',
        "[x](vbscript:msgbox(1))",
    ],
)
def test_markdown_drops_script_urls_svg_style_and_iframes(payload):
    parser = _TagCollector()
    parser.feed(markdown_to_safe_html(payload))
    for tag, attrs in parser.tags:
        assert tag not in {"svg", "style", "iframe", "script", "object", "embed"}
        for name, value in attrs:
            assert not name.startswith("on")
            if name in {"href", "src"}:
                assert value.strip().lower().startswith(("http:", "https:", "mailto:"))


def test_usernames_flag_reasons_and_rationales_are_escaped_on_the_dashboard(
    project, admin_user, make_user, make_items
):
    evil = make_user('<img src=x onerror="alert(1)">')
    services.membership_set(project=project, user=evil, role=Membership.Role.LABELER)
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=evil)
    services.item_flag(user=evil, item_id=lease.item_id, reason="<script>alert('flag')</script>")
    client = Client()
    client.force_login(admin_user)
    page = client.get(reverse("labeling:project_dashboard", args=[project.pk])).content.decode()
    assert "<script>alert('flag')" not in page
    assert '<img src=x onerror="alert(1)">' not in page
    assert "&lt;script&gt;" in page
