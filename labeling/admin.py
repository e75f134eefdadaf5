from django.contrib import admin

from labeling import models
from labeling.forms import ThrottledAdminAuthenticationForm

# The admin's own login page is throttled like the site's (labeling.forms.LoginThrottleMixin).
admin.site.login_form = ThrottledAdminAuthenticationForm


class MembershipInline(admin.TabularInline):
    model = models.Membership
    extra = 0
    raw_id_fields = ["user"]


@admin.register(models.Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "k", "annotations_per_item", "allow_ties", "created_at"]
    search_fields = ["name"]
    inlines = [MembershipInline]


@admin.register(models.Prompt)
class PromptAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "short_text", "created_at"]
    list_filter = ["project"]
    search_fields = ["text"]

    @admin.display(description="text")
    def short_text(self, obj):
        return obj.text[:80]


@admin.register(models.Completion)
class CompletionAdmin(admin.ModelAdmin):
    list_display = ["id", "prompt_id", "source", "model_name", "created_at"]
    list_filter = ["source"]
    raw_id_fields = ["prompt"]


class ItemCompletionInline(admin.TabularInline):
    model = models.ItemCompletion
    extra = 0
    raw_id_fields = ["completion"]


@admin.register(models.Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "source", "ranking_count", "is_complete", "created_at"]
    list_filter = ["project", "source", "is_complete"]
    raw_id_fields = ["prompt"]
    inlines = [ItemCompletionInline]


@admin.register(models.Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ["id", "item_id", "user", "status", "expires_at"]
    list_filter = ["status"]
    raw_id_fields = ["item", "user"]


@admin.register(models.Ranking)
class RankingAdmin(admin.ModelAdmin):
    list_display = ["id", "item_id", "user", "source", "seconds_spent", "created_at"]
    list_filter = ["source"]
    raw_id_fields = ["item", "user"]


@admin.register(models.Flag)
class FlagAdmin(admin.ModelAdmin):
    list_display = ["id", "item_id", "user", "resolved", "created_at"]
    list_filter = ["resolved"]
    raw_id_fields = ["item", "user"]


@admin.register(models.ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["id", "user", "name", "created_at", "last_used_at"]
    readonly_fields = ["key_hash"]
