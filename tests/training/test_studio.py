"""`manage.py studio` (make run): an embedded Redis when REDIS_URL is unset, the demo seeded on
first start with its logins printed, a worker and the web server up, all stopped on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from labeling.management.commands.studio import free_port, start_embedded_redis, stop_process

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_redis_starts_on_a_free_port_keeps_its_data_under_var_and_stops(tmp_path):
    proc, url = start_embedded_redis(tmp_path / "redis")
    try:
        client = redis.Redis.from_url(url)
        assert client.ping() and client.set("k", "v")
        assert url.startswith("redis://127.0.0.1:")
    finally:
        stop_process(proc, timeout=10)
    assert proc.poll() is not None
    assert (tmp_path / "redis").is_dir() and any((tmp_path / "redis").iterdir())  # appendonly data
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(url, socket_timeout=1).ping()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_studio_starts_everything_prints_the_logins_and_stops_on_ctrl_c(tmp_path, tiny_model):
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL")
    }
    env.update(
        VAR_DIR=str(tmp_path / "var"), DEFAULT_BASE_MODEL=tiny_model, CACHE_REDIS="0",
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    log_path = tmp_path / "studio.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "studio", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        text = ""
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            if "ready." in text and _port_open(port):
                break
            assert proc.poll() is None, f"studio exited early:\n{text[-4000:]}"
            time.sleep(0.5)
        else:
            pytest.fail(f"studio did not come up:\n{text[-4000:]}")
        assert f"http://127.0.0.1:{port}/" in text
        assert re.search(r"login 'admin' password '\S+'", text), text[-3000:]
        # the summary (URL and logins) is printed last, once the server answers, framed
        summary = text[text.index(f"RLHF Studio is running at http://127.0.0.1:{port}/") :]
        assert "login 'admin'" in summary and "login 'labeler'" in summary
        assert "=" * 72 in text[: text.index("RLHF Studio is running")]
        redis_url = re.search(r"embedded redis-server at (redis://\S+)", text).group(1)
        assert redis.Redis.from_url(redis_url).ping()
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/accounts/login/", timeout=10
        ) as response:
            assert response.status == 200
            assert response.headers["Server"].startswith("gunicorn")  # not runserver
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/static/css/app.css", timeout=10
        ) as response:
            assert response.status == 200  # whitenoise serves the collected files
        # DEBUG is off: a missing page is the studio's own 404, never Django's technical page
        # listing every URL of the site
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/no-such-page/", timeout=10)
        page = missing.value.read().decode()
        assert missing.value.code == 404 and "RLHF Studio" in page
        assert "URLconf" not in page and "DEBUG = True" not in page
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = log_path.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Stopped." in text and not _port_open(port)
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(redis_url, socket_timeout=1).ping()
