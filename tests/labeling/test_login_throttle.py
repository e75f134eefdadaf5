"""Login attempts are throttled per username and IP (settings.LOGIN_THROTTLE_ATTEMPTS)."""

import pytest
from django.core.cache import cache
from django.urls import reverse

pytestmark = pytest.mark.django_db


@pytest.fixture
def throttle(settings):
    settings.LOGIN_THROTTLE_ATTEMPTS = 3
    settings.LOGIN_THROTTLE_WINDOW_S = 300
    # The counters live in the shared cache (Redis): clear this test's keys, and only those.
    from labeling.forms import _throttle_key

    keys = [_throttle_key(u, ip) for u in ("zoe", "yan") for ip in ("10.0.0.1", "10.0.0.2")]
    cache.delete_many(keys)
    yield
    cache.delete_many(keys)


def _login(client, username, password, ip="10.0.0.1"):
    return client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip
    )


def test_a_correct_password_logs_in(client, make_user, throttle):
    make_user("zoe", password="right-horse-battery")
    response = _login(client, "zoe", "right-horse-battery")
    assert response.status_code == 302 and response["Location"] == reverse("labeling:home")


def test_after_too_many_failures_even_the_right_password_is_refused(client, make_user, throttle):
    make_user("zoe", password="right-horse-battery")
    for _ in range(3):
        assert "Please enter a correct username" in _login(client, "zoe", "wrong").content.decode()
    response = _login(client, "zoe", "right-horse-battery")
    assert response.status_code == 200
    assert "Too many failed login attempts" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_the_throttle_is_per_ip_and_per_username(client, make_user, throttle):
    make_user("zoe", password="right-horse-battery")
    make_user("yan", password="other-horse-battery")
    for _ in range(3):
        _login(client, "zoe", "wrong")
    assert _login(client, "yan", "other-horse-battery").status_code == 302
    client.logout()
    assert _login(client, "zoe", "right-horse-battery", ip="10.0.0.2").status_code == 302


def test_a_success_resets_the_failure_count(client, make_user, throttle):
    make_user("zoe", password="right-horse-battery")
    for _ in range(2):
        _login(client, "zoe", "wrong")
    assert _login(client, "zoe", "right-horse-battery").status_code == 302
    client.logout()
    for _ in range(2):
        _login(client, "zoe", "wrong")
    assert _login(client, "zoe", "right-horse-battery").status_code == 302
