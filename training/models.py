"""Training jobs, the checkpoints they produce and the metric points they stream.

A Job is launched by a project admin (training.services.job_launch), runs on a Celery worker
(training.tasks.job_run) that claims it with a compare-and-set update, and records the exact
data it trained on (input snapshot: ids, count, sha256). Every Checkpoint names the job, the
base model and the parent checkpoint it came from, so a policy's lineage can be walked back to
the rankings that shaped it.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q


class Job(models.Model):
    class Kind(models.TextChoices):
        SFT = "sft", "Supervised fine-tuning (LoRA)"
        REWARD = "reward", "Reward model"
        PPO = "ppo", "PPO"
        DPO = "dpo", "DPO"
        GRPO = "grpo", "GRPO"
        SAMPLE = "sample", "Sample completions"
        EVAL = "eval", "Evaluate A vs B"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Input(models.TextChoices):
        RANKINGS = "rankings"
        PROMPTS = "prompts"
        DEMONSTRATIONS = "demonstrations"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
    FINAL_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    kind = models.CharField(max_length=16, choices=Kind.choices)
    project = models.ForeignKey("labeling.Project", on_delete=models.CASCADE, related_name="jobs")
    # The engine config (rlhf.config.config_to_dict of the validated dataclass), as it ran.
    config = models.JSONField(default=dict)
    # Options outside the engine config (evaluation: max_prompts, send_to_labelers).
    options = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)

    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)

    # Ownership of a running job: the worker that claimed it writes its token with every
    # heartbeat; a write whose token no longer matches means the job was taken away from it.
    run_token = models.CharField(max_length=32, blank=True)
    worker = models.CharField(
        max_length=255, blank=True, help_text="host:pid of the claiming worker"
    )
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    cancel_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    log_tail = models.TextField(blank=True)
    result = models.JSONField(
        default=dict, blank=True, help_text="Summary: final metrics, win rate, counts."
    )

    launched_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    # Input snapshot, frozen at launch: the job trains on exactly these rows.
    input_kind = models.CharField(max_length=16, choices=Input.choices)
    input_ids = models.JSONField(default=list, help_text="Ranking, prompt or completion ids.")
    input_count = models.PositiveIntegerField(default=0)
    input_hash = models.CharField(max_length=64, blank=True, help_text="sha256 of the engine rows.")

    # What the policy starts from: a base model, or a parent checkpoint (its adapter on its base).
    base_model = models.CharField(max_length=500)
    parent_checkpoint = models.ForeignKey(
        "Checkpoint", null=True, blank=True, on_delete=models.PROTECT, related_name="child_jobs"
    )
    # Evaluation: the policy compared against parent_checkpoint (None = the base model).
    compare_checkpoint = models.ForeignKey(
        "Checkpoint",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="compared_in_jobs",
    )
    # PPO / GRPO / evaluation: a reward-model checkpoint, or a built-in rule (training.rewards).
    reward_checkpoint = models.ForeignKey(
        "Checkpoint", null=True, blank=True, on_delete=models.PROTECT, related_name="rewarded_jobs"
    )
    reward_rule = models.CharField(max_length=64, blank=True)

    output_dir = models.CharField(max_length=1000, blank=True)
    # Devices (GPUs) the job trains on: one process each, under torchrun when more than one.
    # A job is sent to the queue of its size (training.services.job_queue); a worker consumes
    # the queues of the sizes it can hold (WORKER_DEVICES, training.worker).
    devices = models.PositiveSmallIntegerField(default=1)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["status", "heartbeat_at"], name="job_status_heartbeat_idx"),
            models.Index(fields=["project", "-id"], name="job_project_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(max_attempts__gte=1), name="job_max_attempts_at_least_1"
            ),
            models.CheckConstraint(condition=Q(devices__gte=1), name="job_devices_at_least_1"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.pk}"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE_STATUSES

    @property
    def progress_percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        if not self.total_steps:
            return 0
        return min(100, round(100 * self.step / self.total_steps))


class Checkpoint(models.Model):
    class Role(models.TextChoices):
        POLICY = "policy"
        REWARD = "reward"
        VALUE = "value"

    project = models.ForeignKey(
        "labeling.Project", on_delete=models.CASCADE, related_name="checkpoints"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    name = models.CharField(max_length=200, blank=True)
    path = models.CharField(
        max_length=1000, help_text="The checkpoint folder (adapter + state.json)."
    )
    base_model = models.CharField(max_length=500)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="checkpoints"
    )
    step = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["path", "role"], name="checkpoint_path_role_once"),
        ]

    def __str__(self) -> str:
        return self.name or f"{self.role} #{self.pk}"


class MetricPoint(models.Model):
    """One metric value at one step. The id is the cursor that the charts poll with."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="metric_points")
    step = models.PositiveIntegerField()
    key = models.CharField(max_length=64)
    value = models.FloatField()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["job", "id"], name="metricpoint_job_cursor_idx")]
