"""Load test of the labeling API: N simulated labelers against the app under gunicorn.

    .venv/bin/python benchmarks/labeling_load.py --labelers 50 --seconds 30 \\
        --database-url postgres://postgres@127.0.0.1:5432/bench

What it does:
1. Migrates the database at --database-url (default: a fresh SQLite file under var/bench/),
   seeds a new project (K=4, --annotations-per-item labelers wanted per item, --items items
   imported through labeling.importexport) and N labeler accounts with API tokens.
   Then ANALYZE, as autovacuum would soon after a big import, so the planner knows the
   tables' sizes.
2. Starts gunicorn on 127.0.0.1 at a free port (config.wsgi, production settings: DEBUG=0)
   on that database: by default cores + 1 gthread workers with 8 threads each and HTTP
   keep-alive (--worker-class sync gives the classic one-request-per-process server).
3. Runs N labeler threads for --seconds: each loops POST /api/projects/{id}/next then
   POST /api/items/{id}/ranking with a random order of the completions it was shown,
   over plain http.client (stdlib), one kept-alive connection per labeler as a browser
   would hold (a new connection per request with sync workers, which close it),
   optionally "thinking" --think-ms between the two. With no think time the loop is closed
   at full speed, so latency is simply labelers / throughput (Little's law); a think time
   models people, whose load is labelers / (think + latency).
4. Reports rankings/s, p50/p95/max latency of next and submit, errors (any non-200 or
   exception, and any "database is locked" in the server log), then checks the database:
   exactly one ranking per successful submit (no lost or doubled rankings), no item with
   more rankings or leases than wanted, no labeler ranking an item twice.

Only loopback addresses are used. Exit status 1 when a check fails or a request errored.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labelers", type=int, default=10)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument(
        "--database-url",
        default=None,
        help="postgres://... or sqlite:///path (default: a fresh SQLite file under var/bench/)",
    )
    p.add_argument(
        "--worker-class",
        choices=["gthread", "sync"],
        default="gthread",
        help="gunicorn worker class (gthread keeps connections alive; sync closes them)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="gunicorn worker processes (default: cores + 1 for gthread, 2 * cores + 1 for sync)",
    )
    p.add_argument("--threads", type=int, default=8, help="threads per gthread worker")
    p.add_argument("--keep-alive", type=int, default=30, help="seconds (gthread)")
    p.add_argument(
        "--items",
        type=int,
        default=0,
        help="items to seed (default: 400 per labeler, at least 4000)",
    )
    p.add_argument("--annotations-per-item", type=int, default=2)
    p.add_argument("--k", type=int, default=4)
    p.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="time a labeler spends on an item before submitting (uniform 0.5x to 1.5x); "
        "0 = closed loop at full speed, where latency is just labelers / throughput",
    )
    p.add_argument(
        "--json", dest="json_out", default=None, help="also write the results to this file"
    )
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# --------------------------------------------------------------------------- seeding (in-process Django)


def django_setup(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("CACHE_REDIS", "0")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    ensure_database()


def ensure_database() -> None:
    """Create the benchmark's PostgreSQL database when it does not exist yet."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    import psycopg

    params = connection.get_connection_params()
    name = connection.settings_dict["NAME"]
    admin = {k: v for k, v in params.items() if k in {"host", "port", "user", "password"}}
    with psycopg.connect(dbname="postgres", autocommit=True, **admin) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def seed(*, labelers: int, items: int, k: int, annotations_per_item: int) -> tuple[int, list[str]]:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from labeling import services
    from labeling.auth import api_token_create
    from labeling.importexport import import_file
    from labeling.models import Membership

    call_command("migrate", verbosity=0)
    User = get_user_model()
    tag = f"{int(time.time())}-{os.getpid()}"
    admin = User.objects.create_user(username=f"bench-admin-{tag}")
    project = services.project_create(
        name=f"Load test {tag}", created_by=admin, k=k, annotations_per_item=annotations_per_item
    )
    lines = io.BytesIO()
    for i in range(items):
        row = {
            "prompt": f"Bench prompt {i}: explain item {i}.",
            "completions": [f"Answer {j} to {i}." for j in range(k)],
        }
        lines.write(json.dumps(row).encode() + b"\n")
    lines.seek(0)
    report = import_file(project=project, fileobj=lines, fmt="jsonl", user=admin)
    assert report.items == items, report
    tokens = []
    for n in range(labelers):
        user = User.objects.create_user(username=f"bench-{tag}-labeler-{n}")
        services.membership_set(project=project, user=user, role=Membership.Role.LABELER)
        tokens.append(api_token_create(user=user, name="load test"))
    from django.db import connection

    with connection.cursor() as cursor:  # the planner's statistics, as autovacuum would
        cursor.execute("ANALYZE")
    return project.pk, tokens


def db_checks(*, project_id: int, submitted_ids: set[int]) -> dict:
    from django.db.models import Count, Q

    from labeling.models import Assignment, Item, Project, Ranking

    project = Project.objects.get(pk=project_id)
    wanted = project.annotations_per_item
    rankings = Ranking.objects.filter(item__project=project, user__isnull=False)
    stored_ids = set(rankings.values_list("id", flat=True))
    live = Q(assignments__status__in=[Assignment.Status.ACTIVE, Assignment.Status.SUBMITTED])
    per_item = Item.objects.filter(project=project).annotate(
        n_rankings=Count("rankings", filter=Q(rankings__user__isnull=False), distinct=True),
        n_leases=Count("assignments", filter=live, distinct=True),
    )
    rows = list(per_item.values_list("ranking_count", "n_rankings", "n_leases"))
    over_ranked = sum(1 for _, n, _ in rows if n > wanted)
    over_leased = sum(1 for _, _, n in rows if n > wanted)
    count_mismatch = sum(1 for stored, n, _ in rows if stored != n)
    doubled = rankings.values("item", "user").annotate(n=Count("id")).filter(n__gt=1).count()
    return {
        "rankings_in_db": len(stored_ids),
        "successful_submits": len(submitted_ids),
        "lost": len(submitted_ids - stored_ids),
        "unexpected": len(stored_ids - submitted_ids),
        "items_over_ranked": over_ranked,
        "items_over_leased": over_leased,
        "doubled_item_user": doubled,
        "ranking_count_mismatch": count_mismatch,
        "ok": stored_ids == submitted_ids
        and over_ranked == over_leased == doubled == count_mismatch == 0,
    }


# --------------------------------------------------------------------------- server


def start_gunicorn(
    *,
    port: int,
    workers: int,
    database_url: str,
    log_path: Path,
    worker_class: str = "gthread",
    threads: int = 8,
    keep_alive: int = 30,
) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        DEBUG="0",
        SECRET_KEY=env.get("SECRET_KEY") or "load-test-" + os.urandom(16).hex(),
        ALLOWED_HOSTS=HOST,
        SECURE_SSL_REDIRECT="0",
        SECURE_COOKIES="0",
        SECURE_HSTS_SECONDS="0",
        LOG_LEVEL="WARNING",
        CACHE_REDIS=env.get("CACHE_REDIS", "0"),
        DJANGO_SETTINGS_MODULE="config.settings",
    )
    gunicorn = Path(sys.executable).with_name("gunicorn")
    cmd = [
        str(gunicorn),
        "config.wsgi",
        "--bind", f"{HOST}:{port}",
        "--workers", str(workers),
        "--worker-class", worker_class,
        *(["--threads", str(threads), "--keep-alive", str(keep_alive)]
          if worker_class == "gthread" else []),
        "--backlog", "2048",
        "--timeout", "60",
        "--preload",
        "--log-level", "warning",
    ]  # fmt: skip
    log = log_path.open("wb")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited with {proc.returncode}; see {log_path}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/api/openapi.json")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"gunicorn did not answer within 60 s; see {log_path}")


class CpuTotals(dict):
    def __sub__(self, other):
        return {k: self[k] - other.get(k, 0.0) for k in self}


def server_cpu_seconds(proc: subprocess.Popen, db_name: str = "") -> CpuTotals:
    """CPU seconds (user + system) of gunicorn and its workers, and of the PostgreSQL backend
    processes serving `db_name` (their process title names the database)."""
    import psutil

    totals = CpuTotals(app=0.0, db=0.0)
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            totals["app"] += t.user + t.system
    except psutil.Error:
        pass
    if not db_name:
        return totals
    for p in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if (p.info["name"] or "").startswith("postgres") and f" {db_name} " in f" {title} ":
            try:
                t = p.cpu_times()
                totals["db"] += t.user + t.system
            except psutil.Error:
                pass
    return totals


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: gunicorn and its workers only
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- labelers


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.next_latency: list[float] = []
        self.submit_latency: list[float] = []
        self.submitted: set[int] = set()
        self.errors: Counter = Counter()
        self.empty = 0
        self.reconnects = 0


class Client:
    """One labeler's HTTP connection, kept alive between requests when the server allows it
    (http.client reopens it after a response that closes it)."""

    def __init__(self, port: int, token: str):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=60)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.reconnects = 0

    def request(self, method: str, path: str, body: dict | None) -> tuple[int, dict | None]:
        payload = json.dumps(body) if body is not None else None
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=payload, headers=self.headers)
                response = self.conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server closed an idle kept-alive connection before reading this request:
                # reopen and send it again (next and submit are both safe to repeat).
                self.conn.close()
                if attempt == 2:
                    raise
                self.reconnects += 1
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = None
        return response.status, parsed

    def close(self) -> None:
        self.conn.close()


def labeler(
    port: int,
    project_id: int,
    token: str,
    until: float,
    stats: Stats,
    seed_value: int,
    think_s: float,
) -> None:
    rng = random.Random(seed_value)
    client = Client(port, token)
    try:
        _label_until(client, project_id, until, stats, rng, think_s)
    finally:
        client.close()
        with stats.lock:
            stats.reconnects += client.reconnects


def _label_until(
    client: Client, project_id: int, until: float, stats: Stats, rng: random.Random, think_s: float
) -> None:
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            status, body = client.request("POST", f"/api/projects/{project_id}/next", {})
        except OSError as exc:
            with stats.lock:
                stats.errors[f"next: {type(exc).__name__}"] += 1
            continue
        t1 = time.perf_counter()
        if status != 200:
            with stats.lock:
                stats.errors[f"next: HTTP {status}"] += 1
            continue
        with stats.lock:
            stats.next_latency.append(t1 - t0)
        item = body["item"]
        if item is None:
            with stats.lock:
                stats.empty += 1
            time.sleep(0.05)
            continue
        if think_s:
            time.sleep(think_s * rng.uniform(0.5, 1.5))
        order = list(item["display_order"])
        rng.shuffle(order)
        ranking = {
            "groups": [[cid] for cid in order],
            "seconds_spent": round(rng.uniform(2, 30), 2),
        }
        t2 = time.perf_counter()
        try:
            status, body = client.request("POST", f"/api/items/{item['id']}/ranking", ranking)
        except OSError as exc:
            with stats.lock:
                stats.errors[f"submit: {type(exc).__name__}"] += 1
            continue
        t3 = time.perf_counter()
        with stats.lock:
            if status == 200:
                stats.submit_latency.append(t3 - t2)
                stats.submitted.add(body["id"])
            else:
                stats.errors[
                    f"submit: HTTP {status} {body.get('code') if body else ''}".strip()
                ] += 1


def run(args) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_dir = ROOT / "var" / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    database_url = (
        args.database_url or f"sqlite:///{bench_dir / f'bench-{stamp}-{os.getpid()}.sqlite3'}"
    )
    items = args.items or max(4000, 400 * args.labelers)
    django_setup(database_url)
    t = time.perf_counter()
    project_id, tokens = seed(
        labelers=args.labelers,
        items=items,
        k=args.k,
        annotations_per_item=args.annotations_per_item,
    )
    seed_s = time.perf_counter() - t
    from django.db import connections

    connections.close_all()

    port = free_port()
    log_path = bench_dir / f"gunicorn-{stamp}-{port}.log"
    cores = os.cpu_count() or 1
    workers = args.workers or (cores + 1 if args.worker_class == "gthread" else 2 * cores + 1)
    load_before = os.getloadavg()[0]
    server = start_gunicorn(
        port=port,
        workers=workers,
        database_url=database_url,
        log_path=log_path,
        worker_class=args.worker_class,
        threads=args.threads,
        keep_alive=args.keep_alive,
    )
    stats = Stats()
    try:
        started = time.monotonic()
        until = started + args.seconds
        threads = [
            threading.Thread(
                target=labeler,
                args=(port, project_id, token, until, stats, n, args.think_ms / 1000),
                daemon=True,
            )
            for n, token in enumerate(tokens)
        ]
        for th in threads:
            th.start()
        db_name = (
            database_url.rsplit("/", 1)[-1].split("?")[0]
            if database_url.startswith(("postgres", "pgsql"))
            else ""
        )
        cpu_before = server_cpu_seconds(server, db_name)
        client_before = time.process_time()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - started
        server_cpu = server_cpu_seconds(server, db_name) - cpu_before
        client_cpu = time.process_time() - client_before
    finally:
        stop(server)
    server_log = log_path.read_text(errors="replace")
    locked = server_log.count("database is locked")
    server_errors = server_log.count("Traceback")

    checks = db_checks(project_id=project_id, submitted_ids=stats.submitted)
    cycle = sorted(stats.next_latency + stats.submit_latency)
    engine = "postgresql" if database_url.startswith(("postgres", "pgsql")) else "sqlite"
    result = {
        "engine": engine,
        "labelers": args.labelers,
        "seconds": round(elapsed, 1),
        "server": f"gunicorn {args.worker_class} x{workers}"
        + (
            f", {args.threads} threads, keep-alive {args.keep_alive}s"
            if args.worker_class == "gthread"
            else ""
        ),
        "workers": workers,
        "items_seeded": items,
        "annotations_per_item": args.annotations_per_item,
        "think_ms": args.think_ms,
        "seed_seconds": round(seed_s, 1),
        "rankings": len(stats.submitted),
        "rankings_per_s": round(len(stats.submitted) / elapsed, 1),
        "requests": len(cycle),
        "p50_ms": ms(percentile(cycle, 0.50)),
        "p95_ms": ms(percentile(cycle, 0.95)),
        "next_p50_ms": ms(percentile(stats.next_latency, 0.50)),
        "next_p95_ms": ms(percentile(stats.next_latency, 0.95)),
        "submit_p50_ms": ms(percentile(stats.submit_latency, 0.50)),
        "submit_p95_ms": ms(percentile(stats.submit_latency, 0.95)),
        "max_ms": ms(max(cycle) if cycle else None),
        "errors": sum(stats.errors.values()),
        "error_kinds": dict(stats.errors),
        "database_is_locked_in_log": locked,
        "server_tracebacks": server_errors,
        "no_item_left": stats.empty,
        # CPU the app (gunicorn workers) and PostgreSQL's backends used per ranking: on a
        # machine shared with other work the wall-clock rate understates the capacity.
        "app_cpu_ms_per_ranking": ms(server_cpu["app"] / max(1, len(stats.submitted))),
        "db_cpu_ms_per_ranking": ms(server_cpu["db"] / max(1, len(stats.submitted)))
        if engine == "postgresql"
        else None,
        "client_cpu_ms_per_ranking": ms(client_cpu / max(1, len(stats.submitted))),
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "reconnects": stats.reconnects,
        "db_check": checks,
        "server_log": str(log_path),
    }
    return result


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    c = result["db_check"]
    print(
        f"\n{result['engine']}, {result['labelers']} labelers (think {result['think_ms']:g} ms), "
        f"{result['seconds']} s, {result['server']}: "
        f"{result['rankings_per_s']} rankings/s, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms "
        f"(next p95 {result['next_p95_ms']} ms, submit p95 {result['submit_p95_ms']} ms), "
        f"errors {result['errors']}, 'database is locked' {result['database_is_locked_in_log']}; "
        f"DB: {c['rankings_in_db']} rankings for {c['successful_submits']} successful submits, "
        f"lost {c['lost']}, unexpected {c['unexpected']}, over-assigned items {c['items_over_leased']}, "
        f"over-ranked items {c['items_over_ranked']} -> {'OK' if c['ok'] else 'FAILED'}"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    failed = (
        not c["ok"]
        or result["errors"]
        or result["database_is_locked_in_log"]
        or result["server_tracebacks"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
