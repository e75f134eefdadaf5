"""Settings come only from the environment; production mode has no defaults to fall back on."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from config.env import ImproperlyConfiguredEnv, database_from_url, env_bool

ROOT = Path(__file__).resolve().parents[2]


def manage(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"SECRET_KEY", "ALLOWED_HOSTS", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, "VAR_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_settings_pass_check_deploy_with_nothing_to_report(tmp_path):
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        env={
            "DEBUG": "0",
            "SECRET_KEY": secrets.token_urlsafe(60),
            "ALLOWED_HOSTS": "studio.example.com",
        },
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_production_mode_refuses_to_start_without_a_secret_key(tmp_path):
    result = manage("check", env={"DEBUG": "0"}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr
    assert not (tmp_path / "secret_key").exists()


def test_production_mode_refuses_to_start_without_allowed_hosts(tmp_path):
    env = {"DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(60)}
    result = manage("check", env=env, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "ALLOWED_HOSTS must be set when DEBUG is off" in result.stderr
    result = manage("check", env={**env, "ALLOWED_HOSTS": " , "}, tmp_path=tmp_path)
    assert "ALLOWED_HOSTS must be set" in result.stderr  # blanks are not host names


def test_local_mode_generates_a_secret_key_once_and_keeps_it(tmp_path):
    for _ in range(2):
        assert manage("check", env={"DEBUG": "1"}, tmp_path=tmp_path).returncode == 0
    key = (tmp_path / "secret_key").read_text()
    assert len(key) >= 50 and (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_database_url_parsing_for_postgres_and_sqlite():
    pg = database_from_url("postgres://u:p%40ss@db.example.com:6432/studio?sslmode=require")
    assert (pg["ENGINE"], pg["NAME"], pg["USER"], pg["PASSWORD"], pg["HOST"], pg["PORT"]) == (
        "django.db.backends.postgresql",
        "studio",
        "u",
        "p@ss",
        "db.example.com",
        "6432",
    )
    assert pg["OPTIONS"] == {"sslmode": "require"}
    lite = database_from_url("sqlite:////srv/studio/db.sqlite3")
    assert lite["NAME"] == "/srv/studio/db.sqlite3" and lite["OPTIONS"]["timeout"] == 30
    with pytest.raises(ImproperlyConfiguredEnv, match="mysql"):
        database_from_url("mysql://x/y")


def test_a_bad_boolean_fails_loudly(monkeypatch):
    monkeypatch.setenv("DEBUG", "maybe")
    with pytest.raises(ImproperlyConfiguredEnv, match="DEBUG='maybe' is not a boolean"):
        env_bool("DEBUG", True)


@pytest.mark.django_db
def test_every_page_carries_a_content_security_policy_without_inline_scripts(client):
    policy = client.get("/accounts/login/").headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("style-src")[0]
    assert "img-src 'self' data:" in policy and "frame-ancestors 'none'" in policy
