"""The Celery app. Broker: REDIS_URL. Queue `gpu` runs sampling and training (one job per
GPU, prefetch 1); queue `default` runs light work."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("rlhf_studio")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(
    task_default_queue="default",
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 3600},
    task_ignore_result=True,
    # Sampling and training need a GPU worker; everything else is light.
    task_routes={"training.job_run": {"queue": "gpu"}},
)
app.autodiscover_tasks()
