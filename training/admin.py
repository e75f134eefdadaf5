from django.contrib import admin

from training.models import Checkpoint, Job, MetricPoint


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "kind",
        "project",
        "status",
        "step",
        "total_steps",
        "attempts",
        "worker",
        "created_at",
    )
    list_filter = ("kind", "status")
    search_fields = ("id", "error", "worker")
    raw_id_fields = ("parent_checkpoint", "compare_checkpoint", "reward_checkpoint", "launched_by")
    readonly_fields = ("input_ids", "input_hash", "run_token", "heartbeat_at", "log_tail")


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "role", "project", "job", "parent", "step", "created_at")
    list_filter = ("role",)
    raw_id_fields = ("parent", "job")


@admin.register(MetricPoint)
class MetricPointAdmin(admin.ModelAdmin):
    list_display = ("id", "job", "step", "key", "value")
    raw_id_fields = ("job",)
