"""Writes for the labeling app: projects, members, prompts, items, leases and rankings.

Every function takes keyword-only arguments and raises `LabelingError` (or a subclass)
with a message a labeler or an admin can act on. Callers (views, the JSON API, import,
the training jobs) map `error.status_code` to an HTTP status.

Concurrency (see `assignment_next` and `ranking_submit`): every write that changes how
many labelers an item has (a new lease, a submitted ranking) holds the item's row lock,
so "ranking_count + live leases <= annotations_per_item" holds under any interleaving.
On PostgreSQL the lock is `SELECT ... FOR UPDATE SKIP LOCKED` (labelers never wait on
each other's items); on SQLite every transaction is BEGIN IMMEDIATE (settings), which
serialises writers, and transactions are kept short so waiting writers never time out.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, F, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from labeling.models import (
    Assignment,
    Completion,
    Flag,
    Item,
    ItemCompletion,
    Membership,
    Project,
    Prompt,
    Ranking,
)

# Items labelers rank. Imported items come with their ranking and are not handed out.
QUEUE_SOURCES = (Item.Source.QUEUE, Item.Source.EVAL)
# How many items one `assignment_next` round locks at once (1: never hold a lock it won't use).
_CANDIDATE_BATCH = 1
# Rounds before giving up; each round either leases or rules out an item that filled up.
_MAX_ROUNDS = 25
_rng = random.SystemRandom()


# --------------------------------------------------------------------------- errors


class LabelingError(Exception):
    """A request the labeling rules refuse. `message` is shown to the user as is."""

    status_code = 400
    code = "invalid"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ItemNotFound(LabelingError):
    """The item does not exist or belongs to a project the user is not a member of."""

    status_code = 404
    code = "item_not_found"


class NotAssigned(LabelingError):
    """The user holds no lease on the item (a stale page, or an item never handed to them)."""

    status_code = 409
    code = "not_assigned"


class LeaseExpired(LabelingError):
    """The lease expired and the item was handed to enough other labelers meanwhile."""

    status_code = 409
    code = "lease_expired"


class InvalidRanking(LabelingError):
    """The groups do not cover the item's completions exactly once, or tie when ties are off."""

    status_code = 400
    code = "invalid_ranking"


# --------------------------------------------------------------------------- projects


def project_create(
    *,
    name: str,
    created_by,
    instructions: str = "",
    k: int = 4,
    annotations_per_item: int = 1,
    allow_ties: bool = True,
    lease_seconds: int | None = None,
) -> Project:
    """Create a project; its creator becomes an admin member."""
    name = (name or "").strip()
    if not name:
        raise LabelingError("A project needs a name.")
    if not isinstance(k, int) or not 2 <= k <= 9:
        raise LabelingError(f"K (responses per item) must be between 2 and 9, not {k!r}.")
    if not isinstance(annotations_per_item, int) or not 1 <= annotations_per_item <= 50:
        raise LabelingError(
            f"Annotations per item must be between 1 and 50, not {annotations_per_item!r}."
        )
    if lease_seconds is not None and lease_seconds < 30:
        raise LabelingError("A lease must last at least 30 seconds.")
    with transaction.atomic():
        project = Project.objects.create(
            name=name,
            instructions=instructions or "",
            k=k,
            annotations_per_item=annotations_per_item,
            allow_ties=bool(allow_ties),
            created_by=created_by,
            **({"lease_seconds": lease_seconds} if lease_seconds is not None else {}),
        )
        if created_by is not None:
            Membership.objects.create(project=project, user=created_by, role=Membership.Role.ADMIN)
    return project


def membership_set(*, project: Project, user, role: str) -> Membership:
    """Add `user` to `project` with `role` ("labeler" or "admin"), or change their role."""
    if role not in Membership.Role.values:
        raise LabelingError(
            f"Unknown role {role!r}; use one of {', '.join(Membership.Role.values)}."
        )
    membership, _ = Membership.objects.update_or_create(
        project=project, user=user, defaults={"role": role}
    )
    return membership


def membership_add_by_username(*, project: Project, username: str, role: str) -> Membership:
    """`membership_set` for a username typed into the admin page."""
    username = (username or "").strip()
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise LabelingError(f"There is no user named {username!r}.")
    return membership_set(project=project, user=user, role=role)


def membership_remove(*, project: Project, user) -> None:
    Membership.objects.filter(project=project, user=user).delete()


# --------------------------------------------------------------------------- prompts and items


def prompt_create(
    *, project: Project, text: str, messages: list | None = None, metadata: dict | None = None
) -> Prompt:
    if not isinstance(text, str) or not text.strip():
        if messages:
            text = "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
        else:
            raise LabelingError("A prompt needs text or chat messages.")
    if messages is not None and not (
        isinstance(messages, list) and all(isinstance(m, dict) and "content" in m for m in messages)
    ):
        raise LabelingError('Chat messages must be a list of {"role", "content"} objects.')
    return Prompt.objects.create(
        project=project, text=text, messages=messages, metadata=metadata or {}
    )


def completion_create(
    *,
    prompt: Prompt,
    text: str,
    source: str = Completion.Source.IMPORT,
    checkpoint_id: int | None = None,
    model_name: str = "",
    generation: dict | None = None,
) -> Completion:
    if not isinstance(text, str):
        raise LabelingError("A completion's text must be a string.")
    if source not in Completion.Source.values:
        raise LabelingError(f"Unknown completion source {source!r}.")
    return Completion.objects.create(
        prompt=prompt,
        text=text,
        source=source,
        checkpoint_id=checkpoint_id,
        model_name=model_name or "",
        generation=generation or {},
    )


def item_create(
    *,
    project: Project,
    prompt: Prompt,
    completions: list[Completion],
    source: str = Item.Source.QUEUE,
) -> Item:
    """An item shows exactly `completions` (2 to 9 distinct completions of `prompt`)."""
    if prompt.project_id != project.pk:
        raise LabelingError(f"Prompt {prompt.pk} belongs to another project.")
    if source not in Item.Source.values:
        raise LabelingError(f"Unknown item source {source!r}.")
    ids = [c.pk for c in completions]
    if not 2 <= len(ids) <= 9:
        raise LabelingError(f"An item shows 2 to 9 completions, not {len(ids)}.")
    if len(set(ids)) != len(ids):
        raise LabelingError("An item cannot show the same completion twice.")
    foreign = [c.pk for c in completions if c.prompt_id != prompt.pk]
    if foreign:
        raise LabelingError(f"Completion(s) {_ids(foreign)} answer another prompt.")
    with transaction.atomic():
        item = Item.objects.create(project=project, prompt=prompt, source=source)
        ItemCompletion.objects.bulk_create(
            ItemCompletion(item=item, completion_id=cid, position=i) for i, cid in enumerate(ids)
        )
    return item


def items_create_for_prompt(*, project: Project, prompt: Prompt) -> list[Item]:
    """Group the prompt's completions not yet shown in any item into items of K (in id order).
    A remainder smaller than K waits for more completions."""
    used = ItemCompletion.objects.filter(item__project=project, item__prompt=prompt).values(
        "completion_id"
    )
    unused = list(prompt.completions.exclude(pk__in=used).order_by("id"))
    k = project.k
    items = []
    for start in range(0, len(unused) - k + 1, k):
        items.append(
            item_create(project=project, prompt=prompt, completions=unused[start : start + k])
        )
    return items


# --------------------------------------------------------------------------- leases


def _live(now):
    return Q(status=Assignment.Status.ACTIVE, expires_at__gt=now)


def assignment_next(
    *, project: Project, user, exclude_item_id: int | None = None
) -> Assignment | None:
    """The next item for `user` to rank in `project`, as a lease (an Assignment), or None.

    - A live lease the user already holds is returned again (a reload shows the same item);
      `exclude_item_id` skips the item on screen, so a page can preload the one after it
      (a labeler holds at most two live leases).
    - A new lease goes to the oldest item the user was never given that still has room:
      submitted rankings + live leases < annotations_per_item. Expired leases don't count
      (they are marked expired when their item is next considered).
    - The display order is a fresh random permutation, stored on the lease.
    """
    now = timezone.now()
    own = (
        Assignment.objects.filter(_live(now), item__project=project, user=user)
        .exclude(item_id=exclude_item_id)
        .select_related("item")
        .order_by("created_at", "id")
        .first()
    )
    if own is not None:
        return own

    wanted = project.annotations_per_item
    live_leases = (
        Assignment.objects.filter(_live(now), item=OuterRef("pk"))
        .order_by()
        .values("item")
        .annotate(n=Count("id"))
        .values("n")
    )
    candidates = (
        Item.objects.filter(project=project, is_complete=False, source__in=QUEUE_SOURCES)
        .exclude(Exists(Assignment.objects.filter(item=OuterRef("pk"), user=user)))
        .exclude(Exists(Ranking.objects.filter(item=OuterRef("pk"), user=user)))
        .alias(used=F("ranking_count") + Coalesce(Subquery(live_leases), Value(0)))
        .filter(used__lt=wanted)
        .order_by("id")
    )
    if exclude_item_id is not None:
        candidates = candidates.exclude(pk=exclude_item_id)

    tried: set[int] = set()
    for _ in range(_MAX_ROUNDS):
        with transaction.atomic():
            remaining = candidates.exclude(pk__in=tried)
            # Lock a candidate nobody else holds: labelers skip each other's items, not wait.
            ids = list(
                remaining.select_for_update(skip_locked=True).values_list("id", flat=True)[
                    :_CANDIDATE_BATCH
                ]
            )
            if not ids:
                # Every item with room is locked by another labeler this instant (a short
                # transaction): wait for the first one, then recount it.
                ids = list(remaining.select_for_update().values_list("id", flat=True)[:1])
            if not ids:
                return None
            for item_id in ids:
                tried.add(item_id)
                lease = _lease_if_room(item_id=item_id, user=user, project=project, now=now)
                if lease is not None:
                    return lease
    return None


def _lease_if_room(*, item_id: int, user, project: Project, now) -> Assignment | None:
    """With the item's row locked: recount (in a new statement, so every lease committed by
    whoever held the lock before us is visible), reclaim expired leases, lease if room.
    Every lease of this item is created under this lock, so the checks below cannot race."""
    Assignment.objects.filter(
        item_id=item_id, status=Assignment.Status.ACTIVE, expires_at__lte=now
    ).update(status=Assignment.Status.EXPIRED)
    live = Assignment.objects.filter(_live(now), item=OuterRef("pk")).order_by().values("item")
    row = (
        Item.objects.filter(pk=item_id)
        .annotate(
            live=Coalesce(Subquery(live.annotate(n=Count("id")).values("n")), Value(0)),
            mine=Exists(Assignment.objects.filter(item=OuterRef("pk"), user=user)),
        )
        .values_list("ranking_count", "live", "mine")
        .first()
    )
    if row is None:
        return None
    ranking_count, live_count, mine = row
    if mine or ranking_count + live_count >= project.annotations_per_item:
        return None
    completion_ids = list(
        ItemCompletion.objects.filter(item_id=item_id)
        .order_by("position")
        .values_list("completion_id", flat=True)
    )
    return Assignment.objects.create(
        item_id=item_id,
        user=user,
        status=Assignment.Status.ACTIVE,
        display_order=_rng.sample(completion_ids, len(completion_ids)),
        expires_at=now + timedelta(seconds=project.lease_seconds),
    )


def _item_for_member(*, user, item_id, lock: bool = False) -> Item:
    try:
        item_id = int(item_id)
    except (TypeError, ValueError):
        raise ItemNotFound(f"{item_id!r} is not an item id.") from None
    qs = Item.objects.filter(pk=item_id)
    if not user.is_superuser:
        qs = qs.filter(project__memberships__user=user)
    if lock:
        qs = qs.select_for_update(of=("self",))
    item = qs.select_related("project").first()
    if item is None:
        raise ItemNotFound(f"Item {item_id} does not exist or is not in one of your projects.")
    return item


# --------------------------------------------------------------------------- rankings


def _ids(ids) -> str:
    return ", ".join(str(i) for i in sorted(ids))


def ranking_validate(
    *, groups, completion_ids: list[int], allow_ties: bool, item_id=None
) -> list[list[int]]:
    """Check that `groups` (best first; a group of several ids is a tie) covers exactly
    `completion_ids`, each once. Returns the groups as lists of ints."""
    where = f" of item {item_id}" if item_id is not None else ""
    if not isinstance(groups, list | tuple) or not groups:
        raise InvalidRanking(
            "A ranking is a non-empty list of groups of completion ids, best first."
        )
    clean: list[list[int]] = []
    for group in groups:
        if not isinstance(group, list | tuple) or not group:
            raise InvalidRanking("Each rank must be a non-empty list of completion ids.")
        ids = []
        for cid in group:
            if isinstance(cid, bool) or not isinstance(cid, int | str):
                raise InvalidRanking(f"{cid!r} is not a completion id.")
            try:
                ids.append(int(cid))
            except ValueError:
                raise InvalidRanking(f"{cid!r} is not a completion id.") from None
        clean.append(ids)
    flat = [cid for group in clean for cid in group]
    seen, dups = set(), set()
    for cid in flat:
        (dups if cid in seen else seen).add(cid)
    if dups:
        raise InvalidRanking(f"Completion(s) {_ids(dups)} appear more than once in the ranking.")
    expected = set(completion_ids)
    foreign = seen - expected
    if foreign:
        raise InvalidRanking(f"Completion(s) {_ids(foreign)} are not part of the item{where}.")
    missing = expected - seen
    if missing:
        raise InvalidRanking(
            f"The ranking leaves out completion(s) {_ids(missing)}{where}; rank every response."
        )
    if not allow_ties and any(len(g) > 1 for g in clean):
        raise InvalidRanking("This project does not allow ties: give each response its own rank.")
    return clean


def ranking_submit(
    *,
    user,
    item_id,
    groups,
    rationale: str = "",
    seconds_spent: float | None = None,
    display_order: list[int] | None = None,
) -> Ranking:
    """Store `user`'s ranking of an item they hold a lease on.

    A second submit of the same item returns the ranking stored first (and stores nothing).
    The item's row lock serialises this with `assignment_next`, so the item's
    ranking_count / is_complete are updated atomically with the insert.
    """
    if seconds_spent is not None:
        try:
            seconds_spent = float(seconds_spent)
        except (TypeError, ValueError):
            raise LabelingError("seconds_spent must be a number.") from None
        if not 0 <= seconds_spent < 10**7:
            raise LabelingError("seconds_spent must be a non-negative number of seconds.")
    rationale = (rationale or "").strip()
    if len(rationale) > 10_000:
        raise LabelingError("The rationale is limited to 10,000 characters.")

    with transaction.atomic():
        item = _item_for_member(user=user, item_id=item_id, lock=True)
        existing = Ranking.objects.filter(item=item, user=user).first()
        if existing is not None:
            return existing
        assignment = Assignment.objects.filter(item=item, user=user).first()
        now = timezone.now()
        if assignment is None:
            raise NotAssigned(
                f"Item {item.pk} was not handed to you; reload the page to get your next item."
            )
        if assignment.status == Assignment.Status.SKIPPED:
            raise NotAssigned(f"You skipped item {item.pk}; it cannot be ranked any more.")
        if assignment.status == Assignment.Status.EXPIRED or assignment.expires_at <= now:
            others_live = (
                Assignment.objects.filter(_live(now), item=item).exclude(pk=assignment.pk).count()
            )
            if item.ranking_count + others_live >= item.project.annotations_per_item:
                raise LeaseExpired(
                    f"Your lease on item {item.pk} expired and the item went to other labelers; "
                    "reload the page to get your next item."
                )
        completion_ids = list(
            ItemCompletion.objects.filter(item=item).values_list("completion_id", flat=True)
        )
        clean = ranking_validate(
            groups=groups,
            completion_ids=completion_ids,
            allow_ties=item.project.allow_ties,
            item_id=item.pk,
        )
        shown = assignment.display_order
        if display_order is not None:
            try:
                client_order = [int(c) for c in display_order]
            except (TypeError, ValueError):
                client_order = None
            if client_order is not None and sorted(client_order) == sorted(completion_ids):
                shown = client_order
        try:
            with transaction.atomic():
                ranking = Ranking.objects.create(
                    item=item,
                    user=user,
                    source=Ranking.Source.LABELER,
                    groups=clean,
                    rationale=rationale,
                    seconds_spent=seconds_spent,
                    display_order=shown,
                )
        except IntegrityError:
            # The unique constraint caught a concurrent double submit: keep the first.
            return Ranking.objects.get(item=item, user=user)
        new_count = item.ranking_count + 1
        Item.objects.filter(pk=item.pk).update(
            ranking_count=F("ranking_count") + 1,
            is_complete=new_count >= item.project.annotations_per_item,
        )
        Assignment.objects.filter(pk=assignment.pk).update(status=Assignment.Status.SUBMITTED)
    return ranking


def item_skip(*, user, item_id) -> Assignment:
    """Give the item back; the user is never offered it again."""
    with transaction.atomic():
        item = _item_for_member(user=user, item_id=item_id)
        assignment = Assignment.objects.select_for_update().filter(item=item, user=user).first()
        if assignment is None:
            raise NotAssigned(f"Item {item.pk} was not handed to you, so it cannot be skipped.")
        if assignment.status == Assignment.Status.SUBMITTED:
            raise NotAssigned(f"You already ranked item {item.pk}.")
        if assignment.status != Assignment.Status.SKIPPED:
            assignment.status = Assignment.Status.SKIPPED
            assignment.save(update_fields=["status"])
    return assignment


def item_flag(*, user, item_id, reason: str) -> Flag:
    """Report a problem with an item (shown on the admin dashboard) and give it back."""
    reason = (reason or "").strip()
    if not reason:
        raise LabelingError("Say what is wrong with the item.")
    if len(reason) > 2000:
        raise LabelingError("The reason is limited to 2,000 characters.")
    with transaction.atomic():
        item = _item_for_member(user=user, item_id=item_id)
        flag = Flag.objects.create(item=item, user=user, reason=reason)
        Assignment.objects.filter(item=item, user=user, status=Assignment.Status.ACTIVE).update(
            status=Assignment.Status.SKIPPED
        )
    return flag


def flag_resolve(*, project: Project, flag_id: int) -> Flag:
    flag = Flag.objects.filter(pk=flag_id, item__project=project).first()
    if flag is None:
        raise LabelingError(f"Flag {flag_id} does not exist in this project.")
    if not flag.resolved:
        flag.resolved = True
        flag.save(update_fields=["resolved"])
    return flag


# --------------------------------------------------------------------------- demo data

DEMO_PROJECT_NAME = "Demo: helpful and honest answers"
DEMO_ADMIN = "admin"
DEMO_LABELER = "labeler"


@dataclass
class DemoSeedResult:
    created: bool
    project: Project
    # Only the accounts created by this call, with their one-time passwords.
    passwords: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        if not self.created:
            return [
                f"The demo project {self.project.name!r} exists already (id {self.project.pk})."
            ]
        out = [
            f"Created the demo project {self.project.name!r} (id {self.project.pk}) with "
            f"{self.project.items.count()} items."
        ]
        for username, password in self.passwords.items():
            out.append(f"  login {username!r} password {password!r}  (shown once; store it now)")
        kept = {DEMO_ADMIN, DEMO_LABELER} - set(self.passwords)
        for username in sorted(kept):
            out.append(f"  login {username!r} existed already and keeps its password")
        return out


def demo_seed() -> DemoSeedResult:
    """Create the demo project (about 20 prompts x 4 completions, one item each), an admin
    and a labeler with random passwords. Idempotent: a second call creates nothing."""
    from labeling.demo_data import DEMO_INSTRUCTIONS, DEMO_PROMPTS

    User = get_user_model()
    with transaction.atomic():
        existing = Project.objects.filter(name=DEMO_PROJECT_NAME).first()
        if existing is not None:
            return DemoSeedResult(created=False, project=existing)
        passwords: dict[str, str] = {}
        users = {}
        for username, is_admin in ((DEMO_ADMIN, True), (DEMO_LABELER, False)):
            user = User.objects.filter(username=username).first()
            if user is None:
                password = secrets.token_urlsafe(12)
                user = User.objects.create_user(
                    username=username, password=password, is_staff=is_admin, is_superuser=is_admin
                )
                passwords[username] = password
            users[username] = user
        project = project_create(
            name=DEMO_PROJECT_NAME,
            created_by=users[DEMO_ADMIN],
            instructions=DEMO_INSTRUCTIONS,
            k=4,
            annotations_per_item=2,
            allow_ties=True,
        )
        membership_set(project=project, user=users[DEMO_LABELER], role=Membership.Role.LABELER)
        for entry in DEMO_PROMPTS:
            prompt = prompt_create(
                project=project, text=entry["prompt"], metadata={"topic": entry["topic"]}
            )
            for text in entry["completions"]:
                completion_create(prompt=prompt, text=text, model_name="demo")
            items_create_for_prompt(project=project, prompt=prompt)
    return DemoSeedResult(created=True, project=project, passwords=passwords)
