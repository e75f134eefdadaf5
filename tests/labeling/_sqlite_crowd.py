"""Run by test_sqlite_concurrency.py in a subprocess, with DATABASE_URL pointing at a fresh
SQLite file: migrate, then N threads label a project until its queue is empty. Prints a JSON
summary on the last line of stdout."""

import json
import os
import sys
import threading
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.db.models import Count  # noqa: E402

from labeling import services  # noqa: E402
from labeling.models import Assignment, Item, Ranking  # noqa: E402


def main(labelers: int, items: int, wanted: int) -> dict:
    assert connection.vendor == "sqlite", connection.vendor
    call_command("migrate", verbosity=0)
    User = get_user_model()
    admin = User.objects.create_user("admin", password=None)
    project = services.project_create(
        name="crowd", created_by=admin, k=4, annotations_per_item=wanted
    )
    users = [User.objects.create_user(f"l{i}", password=None) for i in range(labelers)]
    for u in users:
        services.membership_set(project=project, user=u, role="labeler")
    for i in range(items):
        prompt = services.prompt_create(project=project, text=f"p{i}")
        for j in range(4):
            services.completion_create(prompt=prompt, text=f"c{i}.{j}")
        services.items_create_for_prompt(project=project, prompt=prompt)
    connections.close_all()

    errors: list[str] = []
    submitted = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(labelers)

    def label(user):
        try:
            barrier.wait(timeout=30)
            while True:
                lease = services.assignment_next(project=project, user=user)
                if lease is None:
                    return
                # the page preloads the next item while this one is ranked
                services.assignment_next(project=project, user=user, exclude_item_id=lease.item_id)
                services.ranking_submit(
                    user=user, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
                )
                with lock:
                    submitted[0] += 1
        except Exception as e:  # noqa: BLE001 - reported in the summary
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            connections.close_all()

    started = time.monotonic()
    threads = [threading.Thread(target=label, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_item = list(Item.objects.annotate(n=Count("assignments")).values_list("ranking_count", "n"))
    return {
        "errors": errors,
        "submitted": submitted[0],
        "rankings": Ranking.objects.count(),
        "max_rankings_per_item": max(r for r, _ in per_item),
        "complete_items": Item.objects.filter(is_complete=True).count(),
        "duplicate_assignments": Assignment.objects.count()
        - len(set(Assignment.objects.values_list("item_id", "user_id"))),
        "seconds": round(time.monotonic() - started, 2),
    }


if __name__ == "__main__":
    labelers, items, wanted = (int(x) for x in sys.argv[1:4])
    print(json.dumps(main(labelers, items, wanted)))
