"""No Django debug page reaches a person: 404, 403, 400 and 500 are the studio's own pages,
and a client error is logged in one line, without a traceback."""

import logging

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


def _branded(response, status, title):
    html = response.content.decode()
    assert response.status_code == status
    assert f"<h1>{title}</h1>" in html and "RLHF Studio" in html
    assert "Traceback" not in html and "URLconf" not in html and "DEBUG = True" not in html


def test_a_labeler_opening_a_project_they_are_not_in_gets_the_studios_404(
    client, outsider, project
):
    client.force_login(outsider)
    _branded(client.get(f"/projects/{project.pk}/"), 404, "Not found")
    _branded(client.get("/no-such-page/"), 404, "Not found")


@pytest.mark.urls("tests.config.error_urls")
def test_an_unhandled_error_shows_the_studios_500_page():
    _branded(Client(raise_request_exception=False).get("/boom/"), 500, "Something went wrong")


@pytest.mark.urls("tests.config.error_urls")
def test_a_403_is_the_studios_page_and_is_logged_without_a_traceback(client, caplog):
    with caplog.at_level(logging.WARNING, logger="django.request"):
        _branded(client.get("/forbidden/"), 403, "Forbidden")
    (record,) = [r for r in caplog.records if r.name == "django.request"]
    assert record.getMessage() == "Forbidden (Permission denied): /forbidden/"
    assert record.exc_info is None and "Traceback" not in caplog.text


@pytest.mark.urls("tests.config.error_urls")
def test_a_server_error_keeps_its_traceback_in_the_log(caplog):
    with caplog.at_level(logging.ERROR, logger="django.request"):
        Client(raise_request_exception=False).get("/boom/")
    assert "RuntimeError: a bug" in caplog.text


def test_a_request_for_an_unknown_host_gets_the_studios_400(client):
    _branded(client.get("/", headers={"host": "evil.example"}), 400, "Bad request")
