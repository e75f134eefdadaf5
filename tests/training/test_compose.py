"""docker-compose.yml: `docker compose config` accepts it, refuses to run without a SECRET_KEY,
and it wires a GPU worker and shared checkpoint storage. No Docker engine is needed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose_command() -> list[str]:
    if shutil.which("docker") is None and shutil.which("docker-compose") is None:
        pytest.skip("the docker client is not installed")
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("docker is installed without the compose plugin (apt-get install docker-compose)")


def run_config(
    *args: str, secret: str | None, db_password: str | None = "test-db-password"
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "POSTGRES_PASSWORD"}}
    if secret is not None:
        env["SECRET_KEY"] = secret
    if db_password is not None:
        env["POSTGRES_PASSWORD"] = db_password
    return subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_docker_compose_config_accepts_the_file():
    result = run_config("-q", secret="test-secret")
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_secret_key():
    result = run_config("-q", secret=None)
    assert result.returncode != 0 and "SECRET_KEY" in result.stderr


def test_compose_has_no_default_database_password():
    result = run_config("-q", secret="test-secret", db_password=None)
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def test_compose_has_postgres_redis_web_and_a_gpu_worker_sharing_checkpoints():
    result = run_config(secret="test-secret")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"postgres", "redis", "web", "worker"} <= set(services)
    web_command = services["web"]["command"]
    assert "gunicorn" in (" ".join(web_command) if isinstance(web_command, list) else web_command)
    worker = services["worker"]
    assert (
        worker["command"][:4] == ["celery", "-A", "config", "worker"]
        and "gpu,default" in worker["command"]
    )
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    mounts = {
        s: {
            str(v.get("source") if isinstance(v, dict) else v).split(":")[0]
            for v in services[s]["volumes"]
        }
        for s in ("web", "worker")
    }
    assert "checkpoints" in mounts["web"] and "checkpoints" in mounts["worker"]
    for name in ("web", "worker"):
        env = services[name]["environment"]
        assert env["DEBUG"] == "0" and env["SECRET_KEY"] == "test-secret"
        assert env["DATABASE_URL"].startswith("postgres://") and env["REDIS_URL"].startswith(
            "redis://redis"
        )
        assert env["CHECKPOINT_DIR"].startswith("/data")
