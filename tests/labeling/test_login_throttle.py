"""Login attempts are throttled per username and IP (settings.LOGIN_THROTTLE_ATTEMPTS)."""

import threading
from unittest import mock

import pytest
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.cache import cache
from django.db import connections
from django.test import Client
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


@pytest.mark.django_db(transaction=True)  # each thread reads the user on its own connection
def test_concurrent_attempts_check_at_most_the_limit_of_passwords(make_user, throttle, settings):
    """39 wrong passwords at once: each request holds inside the password check until every
    request has either reached it or been answered, so all of them pass the throttle while
    the others' hashes run (what a slow hash allows). Only LOGIN_THROTTLE_ATTEMPTS may reach
    the hash, and the right password afterwards is still refused within the window."""
    settings.LOGIN_THROTTLE_ATTEMPTS = 5
    make_user("zoe", password="right-horse-battery")
    burst = 39
    checked: list[str] = []
    settled = threading.Condition()  # counts requests that reached the hash or got an answer
    arrived = [0]
    release = threading.Event()
    in_check = threading.local()
    check_password = AbstractBaseUser.check_password

    def settle() -> None:
        with settled:
            arrived[0] += 1
            settled.notify_all()

    def held_check(user, raw_password):
        in_check.reached = True
        with settled:
            checked.append(raw_password)
        settle()
        assert release.wait(timeout=60), "the test never released the password checks"
        return check_password(user, raw_password)

    responses: list[str] = []
    errors: list[str] = []

    def attempt() -> None:
        try:
            response = _login(Client(), "zoe", "wrong")
            responses.append(response.content.decode())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        finally:
            if not getattr(in_check, "reached", False):
                settle()
            connections.close_all()  # this thread's own connection

    with mock.patch.object(AbstractBaseUser, "check_password", held_check):
        threads = [threading.Thread(target=attempt) for _ in range(burst)]
        for t in threads:
            t.start()
        with settled:
            all_settled = settled.wait_for(lambda: arrived[0] == burst, timeout=60)
        release.set()
        for t in threads:
            t.join(timeout=60)
    assert all_settled and not any(t.is_alive() for t in threads) and not errors, errors
    assert len(checked) == 5, f"{len(checked)} passwords were checked"
    throttled = [r for r in responses if "Too many failed login attempts" in r]
    assert len(throttled) == burst - 5
    client = Client()
    response = _login(client, "zoe", "right-horse-battery")
    assert response.status_code == 200
    assert "Too many failed login attempts" in response.content.decode()
    assert "_auth_user_id" not in client.session
