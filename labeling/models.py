"""The preference data model.

Project -> Prompt -> Completion; an Item is a prompt with the exact completions shown
(ItemCompletion, fixed once created); an Assignment is a labeler's lease on an item; a
Ranking is the order a labeler (or an import) gave, as groups of completion ids (a group
holds ties), with the display order the labeler saw.
"""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from rlhf.rankings import MAX_K, MIN_K


class Project(models.Model):
    name = models.CharField(max_length=200)
    instructions = models.TextField(blank=True, help_text="Markdown shown above every item.")
    k = models.PositiveSmallIntegerField(
        default=4,
        validators=[MinValueValidator(MIN_K), MaxValueValidator(MAX_K)],
        help_text=f"Responses shown per item ({MIN_K} to {MAX_K}).",
    )
    annotations_per_item = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(50)]
    )
    allow_ties = models.BooleanField(default=True)
    lease_seconds = models.PositiveIntegerField(default=1800)
    # Disagreement routing (labeling.routing): items the reward model ranks against the
    # labelers' consensus, or with its smallest margins, go first to this many labelers.
    route_disagreements = models.BooleanField(
        default=False,
        help_text="Send first, to more labelers, the items where the reward model disagrees "
        "with the labelers or is least sure.",
    )
    routed_annotations_per_item = models.PositiveSmallIntegerField(
        default=3,
        validators=[MinValueValidator(1), MaxValueValidator(50)],
        help_text="Labelers per routed item (at least the project's labelers per item).",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, through="Membership", related_name="labeling_projects"
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(k__gte=2, k__lte=9), name="project_k_2_to_9"),
            models.CheckConstraint(
                condition=Q(annotations_per_item__gte=1), name="project_annotations_at_least_1"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        LABELER = "labeler"
        ADMIN = "admin"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.LABELER)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "user"], name="one_membership_per_user")
        ]


class Prompt(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="prompts")
    text = models.TextField(help_text="The prompt as plain text (for chat, the rendered turns).")
    messages = models.JSONField(
        null=True, blank=True, help_text='Chat turns: [{"role": "user", "content": "..."}, ...]'
    )
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]


class Completion(models.Model):
    class Source(models.TextChoices):
        IMPORT = "import"
        MODEL = "model"  # sampled from a checkpoint: see checkpoint_id and generation

    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="completions")
    text = models.TextField()
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.IMPORT)
    # training.Checkpoint id that generated it (a plain id keeps the apps' migrations acyclic).
    checkpoint_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    model_name = models.CharField(max_length=500, blank=True)
    generation = models.JSONField(
        default=dict, blank=True, help_text="Sampling settings, seed, token count."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]


class Item(models.Model):
    class Source(models.TextChoices):
        QUEUE = "queue"  # to be ranked by labelers
        IMPORT = "import"  # came with a ranking from an import
        EVAL = "eval"  # A-vs-B pair sent by an evaluation job

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="items")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="items")
    completions = models.ManyToManyField(Completion, through="ItemCompletion", related_name="items")
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.QUEUE)
    # Denormalised count of labeler rankings, updated in the same transaction as the ranking.
    ranking_count = models.PositiveIntegerField(default=0)
    is_complete = models.BooleanField(default=False, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["project", "is_complete", "id"], name="item_queue_idx")]


class ItemCompletion(models.Model):
    item = models.ForeignKey(Item, on_delete=models.CASCADE, related_name="item_completions")
    completion = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+")
    position = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["position"]
        constraints = [
            models.UniqueConstraint(fields=["item", "completion"], name="item_completion_once"),
            models.UniqueConstraint(fields=["item", "position"], name="item_position_once"),
        ]


class Assignment(models.Model):
    """A labeler's lease on an item. One row per (item, labeler), ever: a labeler never
    sees the same item twice."""

    class Status(models.TextChoices):
        ACTIVE = "active"
        SUBMITTED = "submitted"
        SKIPPED = "skipped"
        EXPIRED = "expired"

    item = models.ForeignKey(Item, on_delete=models.CASCADE, related_name="assignments")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assignments"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    display_order = models.JSONField(
        help_text="Completion ids in the order this labeler sees them."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["item", "user"], name="one_assignment_per_item_user")
        ]
        indexes = [
            models.Index(fields=["item", "status", "expires_at"], name="assignment_live_idx"),
            # "the user's live lease in this project", asked on every page load
            models.Index(fields=["user", "status", "expires_at"], name="assignment_user_live_idx"),
        ]


class Ranking(models.Model):
    class Source(models.TextChoices):
        LABELER = "labeler"
        IMPORT = "import"

    item = models.ForeignKey(Item, on_delete=models.CASCADE, related_name="rankings")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="rankings",
    )
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.LABELER)
    # [[best ids...], [next ids...], ...]: a group with several ids is a tie.
    groups = models.JSONField()
    # The ids in `groups` must be exactly the item's ItemCompletion ids, each once: checked with
    # a clear message by labeling.services.ranking_validate, and enforced by the database with a
    # trigger (migration 0002) on PostgreSQL and SQLite, whoever writes the row.
    rationale = models.TextField(blank=True)
    seconds_spent = models.FloatField(null=True, blank=True)
    display_order = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Set when the labeler replaced their ranking (labeling.services.ranking_revise): this row
    # always holds the latest version, the one that counts; earlier ones are RankingRevisions.
    revised_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["item", "user"],
                condition=Q(user__isnull=False),
                name="one_ranking_per_item_user",
            ),
            models.CheckConstraint(
                condition=Q(seconds_spent__isnull=True) | Q(seconds_spent__gte=0),
                name="ranking_seconds_non_negative",
            ),
        ]


class RankingRevision(models.Model):
    """An earlier version of a ranking its labeler replaced: kept as history, never counted
    (exports, agreement and training read the Ranking row, which holds the latest)."""

    ranking = models.ForeignKey(Ranking, on_delete=models.CASCADE, related_name="revisions")
    groups = models.JSONField()
    rationale = models.TextField(blank=True)
    seconds_spent = models.FloatField(null=True, blank=True)
    submitted_at = models.DateTimeField(help_text="When this version was submitted.")
    replaced_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]


class ItemScore(models.Model):
    """The reward model's view of an item (labeling.routing): its score per completion, the
    smallest gap between two of them, and how far its order agrees with the labelers'
    consensus. One row per item, from the latest scoring."""

    item = models.OneToOneField(Item, on_delete=models.CASCADE, related_name="score")
    # Denormalised from the item, for the queue's index.
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    # training.Checkpoint id of the reward model (a plain id keeps the apps' migrations acyclic).
    checkpoint_id = models.BigIntegerField(null=True, blank=True)
    scores = models.JSONField(help_text='{"completion id": reward}')
    margin = models.FloatField(help_text="Smallest gap between two completions' rewards.")
    agreement = models.FloatField(
        null=True,
        blank=True,
        help_text="Share of the pairs the consensus orders that the reward model orders the same "
        "way (None: no ranking yet).",
    )
    routed = models.BooleanField(default=False)
    priority = models.FloatField(default=0.0, help_text="Routed items go out lowest first.")
    scored_at = models.DateTimeField()
    refreshed_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["priority", "item_id"]
        indexes = [
            models.Index(
                fields=["project", "priority", "item"],
                condition=Q(routed=True),
                name="itemscore_routed_idx",
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(margin__gte=0), name="itemscore_margin_gte_0"),
        ]


class Flag(models.Model):
    class Category(models.TextChoices):
        SPAM = "spam", "Spam or gibberish"
        WRONG_LANGUAGE = "wrong_language", "Wrong language"
        UNSAFE = "unsafe", "Unsafe or harmful"
        BROKEN = "broken", "Broken (cut off, garbled, duplicated, empty)"
        PRIVATE = "private", "Personal or private data"
        OTHER = "other", "Other"

    item = models.ForeignKey(Item, on_delete=models.CASCADE, related_name="flags")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    category = models.CharField(
        max_length=32, choices=Category.choices, default=Category.OTHER, db_index=True
    )
    reason = models.TextField(blank=True, help_text="Free text; required for 'other'.")
    resolved = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)


class ApiToken(models.Model):
    """A token for scripts. Only its SHA-256 is stored; the raw token is shown once."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, blank=True)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)


class Invite(models.Model):
    """A one-time link that lets a new person choose a username and password and join a
    project with a role. Only the token's SHA-256 is stored; the link is shown once."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="invites")
    role = models.CharField(
        max_length=16, choices=Membership.Role.choices, default=Membership.Role.LABELER
    )
    token_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    used_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
