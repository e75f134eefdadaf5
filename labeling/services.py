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

import json
import random
import secrets
from dataclasses import dataclass, field
from datetime import UTC, timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from config.ids import as_id
from labeling.auth import token_hash
from labeling.models import (
    Assignment,
    Completion,
    Flag,
    Invite,
    Item,
    ItemCompletion,
    ItemScore,
    Membership,
    Project,
    Prompt,
    Ranking,
    RankingRevision,
)
from rlhf.conversations import ConversationError, conversation_check, conversation_text
from rlhf.rankings import (
    MAX_K,
    MIN_K,
    RankingError,
    indices_to_ids,
    k_in_range,
    ranking_check,
)

# Items labelers rank. Imported items come with their ranking and are not handed out.
QUEUE_SOURCES = (Item.Source.QUEUE, Item.Source.EVAL)
# Rounds before giving up; each round either leases or rules out an item that filled up.
_MAX_ROUNDS = 25
_rng = random.SystemRandom()


# --------------------------------------------------------------------------- errors


class LabelingError(Exception):
    """A request the labeling rules refuse. `message` is shown to the user as is."""

    status_code = 400
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        # The request field at fault, where one is (forms attach the message to it).
        self.field = field


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


class MemberNotFound(LabelingError):
    """The user is not a member of the project."""

    status_code = 404
    code = "member_not_found"


class InviteNotFound(LabelingError):
    """The invite link is unknown, used, expired or revoked."""

    status_code = 404
    code = "invite_not_found"


class InvalidRanking(LabelingError):
    """The groups do not cover the item's completions exactly once, or tie when ties are off."""

    status_code = 400
    code = "invalid_ranking"


# --------------------------------------------------------------------------- projects


# The settings an admin sets at creation and may change later (K only while no item exists).
PROJECT_SETTINGS = (
    "name",
    "instructions",
    "k",
    "annotations_per_item",
    "allow_ties",
    "lease_seconds",
)
MIN_LEASE_SECONDS = 30
MAX_LEASE_SECONDS = 30 * 24 * 3600
_UNSET = object()


def _no_nul(value, field: str):
    """Text the database can store: PostgreSQL refuses NUL characters (a 500 if let through)."""
    if isinstance(value, str) and "\x00" in value:
        raise LabelingError(
            f"The {field.replace('_', ' ')} cannot contain NUL characters.", field=field
        )
    return value


def _project_settings_clean(values: dict) -> dict:
    """Check the given project settings; each error names its field."""
    clean = {}
    for key, value in values.items():
        _no_nul(value, key)
        if key == "name":
            value = value.strip() if isinstance(value, str) else ""
            if not value:
                raise LabelingError("A project needs a name.", field="name")
            if len(value) > 200:
                raise LabelingError("A project name is limited to 200 characters.", field="name")
        elif key == "instructions":
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise LabelingError("Instructions must be text.", field="instructions")
        elif key == "k":
            if not k_in_range(value):
                raise LabelingError(
                    f"K (responses per item) must be between {MIN_K} and {MAX_K}, not {value!r}.",
                    field="k",
                )
        elif key == "annotations_per_item":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 50:
                raise LabelingError(
                    f"Annotations per item must be between 1 and 50, not {value!r}.",
                    field="annotations_per_item",
                )
        elif key == "allow_ties":
            if not isinstance(value, bool):
                raise LabelingError("allow_ties must be true or false.", field="allow_ties")
        elif key == "lease_seconds":
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not MIN_LEASE_SECONDS <= value <= MAX_LEASE_SECONDS
            ):
                raise LabelingError(
                    f"A lease must last from {MIN_LEASE_SECONDS} seconds to 30 days "
                    f"({MAX_LEASE_SECONDS} seconds), not {value!r}.",
                    field="lease_seconds",
                )
        clean[key] = value
    return clean


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
    values = {
        "name": name,
        "instructions": instructions,
        "k": k,
        "annotations_per_item": annotations_per_item,
        "allow_ties": bool(allow_ties),
    }
    if lease_seconds is not None:
        values["lease_seconds"] = lease_seconds
    values = _project_settings_clean(values)
    with transaction.atomic():
        project = Project.objects.create(created_by=created_by, **values)
        if created_by is not None:
            Membership.objects.create(project=project, user=created_by, role=Membership.Role.ADMIN)
    return project


def project_update(
    *,
    project: Project,
    name=_UNSET,
    instructions=_UNSET,
    k=_UNSET,
    annotations_per_item=_UNSET,
    allow_ties=_UNSET,
    lease_seconds=_UNSET,
) -> Project:
    """Change the settings given (the others stay). K can change only while the project has
    no item (items are made of K completions and never change). A new number of annotations
    per item re-marks which queue items are complete, so raising it sends ranked items back
    to the queue and lowering it completes the ones that now have enough. A new lease length
    applies to leases handed out from now on."""
    given = {
        "name": name,
        "instructions": instructions,
        "k": k,
        "annotations_per_item": annotations_per_item,
        "allow_ties": allow_ties,
        "lease_seconds": lease_seconds,
    }
    values = _project_settings_clean({key: v for key, v in given.items() if v is not _UNSET})
    with transaction.atomic():
        locked = Project.objects.select_for_update().get(pk=project.pk)
        if "k" in values and values["k"] != locked.k and locked.items.exists():
            raise LabelingError(
                f"K cannot change from {locked.k} to {values['k']}: the project has items of "
                f"{locked.k} responses. Make a new project for another K.",
                field="k",
            )
        old_annotations = locked.annotations_per_item
        for key, value in values.items():
            setattr(locked, key, value)
        if values:
            locked.save(update_fields=list(values))
        if locked.annotations_per_item != old_annotations:
            Item.objects.filter(project=locked, source__in=QUEUE_SOURCES).update(
                is_complete=Case(
                    When(ranking_count__gte=locked.annotations_per_item, then=Value(True)),
                    default=Value(False),
                )
            )
    for key, value in values.items():
        setattr(project, key, value)
    return project


def membership_set(*, project: Project, user, role: str) -> Membership:
    """Add `user` to `project` with `role` ("labeler" or "admin"), or change their role. The
    last admin cannot step down; an admin who does loses the invites they had open."""
    if role not in Membership.Role.values:
        raise LabelingError(
            f"Unknown role {role!r}; use one of {', '.join(Membership.Role.values)}."
        )
    with transaction.atomic():
        current = Membership.objects.select_for_update().filter(project=project, user=user).first()
        if current is not None and current.role == Membership.Role.ADMIN and role != current.role:
            _check_not_last_admin(project=project, username=user.username)
            _invites_revoke_by(project=project, user_pk=user.pk)
        membership, _ = Membership.objects.update_or_create(
            project=project, user=user, defaults={"role": role}
        )
    return membership


def _check_not_last_admin(*, project: Project, username: str) -> None:
    admins = Membership.objects.select_for_update().filter(
        project=project, role=Membership.Role.ADMIN
    )
    if len(admins) <= 1:
        raise LabelingError(
            f"{username} is the project's last admin: make another member an admin first.",
            field="user_id",
        )


def _invites_revoke_by(*, project: Project, user_pk: int) -> None:
    """An admin who leaves (or steps down) takes their open invites with them: a link they
    kept must not let them back in."""
    Invite.objects.filter(project=project, created_by_id=user_pk, used_at__isnull=True).delete()


def membership_add_by_username(*, project: Project, username: str, role: str) -> Membership:
    """`membership_set` for a username typed into the admin page."""
    username = (username or "").strip()
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise LabelingError(f"There is no user named {username!r}.")
    return membership_set(project=project, user=user, role=role)


def membership_remove(*, project: Project, user_id) -> None:
    """Take a member out of the project. Their rankings stay (they are data); their live
    leases end at once, so the items go to other labelers. The last admin cannot leave."""
    user_pk = as_id(user_id)
    with transaction.atomic():
        membership = (
            Membership.objects.select_for_update()
            .filter(project=project, user_id=user_pk)
            .select_related("user")
            .first()
            if user_pk is not None
            else None
        )
        if membership is None:
            raise MemberNotFound(f"User {user_id} is not a member of {project.name}.")
        if membership.role == Membership.Role.ADMIN:
            _check_not_last_admin(project=project, username=membership.user.username)
            _invites_revoke_by(project=project, user_pk=user_pk)
        membership.delete()
        Assignment.objects.filter(
            item__project=project, user_id=user_pk, status=Assignment.Status.ACTIVE
        ).update(status=Assignment.Status.EXPIRED)


def user_create_for_project(
    *, project: Project, username: str, password: str, role: str
) -> Membership:
    """Create an account (Django's password rules apply) and make it a member with `role`."""
    if role not in Membership.Role.values:
        raise LabelingError(
            f"Unknown role {role!r}; use one of {', '.join(Membership.Role.values)}.", field="role"
        )
    with transaction.atomic():
        user = _user_create(username=username, password=password)
        return membership_set(project=project, user=user, role=role)


def _user_create(*, username: str, password: str):
    User = get_user_model()
    username = (username or "").strip() if isinstance(username, str) else ""
    try:
        User.username_validator(username)
    except ValidationError as exc:
        raise LabelingError(f"Username: {' '.join(exc.messages)}", field="username") from None
    if not username or len(username) > 150:
        raise LabelingError("A username has 1 to 150 characters.", field="username")
    if User.objects.filter(username__iexact=username).exists():
        raise LabelingError(f"The username {username!r} is taken.", field="username")
    if not isinstance(password, str) or not password:
        raise LabelingError("Choose a password.", field="password")
    try:
        validate_password(password, User(username=username))
    except ValidationError as exc:
        raise LabelingError(" ".join(exc.messages), field="password") from None
    try:
        with transaction.atomic():
            return User.objects.create_user(username=username, password=password)
    except IntegrityError:  # taken by a concurrent request since the check
        raise LabelingError(f"The username {username!r} is taken.", field="username") from None


INVITE_DAYS = 7
MAX_INVITE_DAYS = 90


@dataclass
class InviteCreated:
    invite: Invite
    token: str  # the raw token, for the link; shown once, never stored


def invite_create(
    *, project: Project, role: str, created_by, days: int = INVITE_DAYS
) -> InviteCreated:
    """A one-time link for a new person to join `project` with `role`, valid `days` days."""
    if role not in Membership.Role.values:
        raise LabelingError(
            f"Unknown role {role!r}; use one of {', '.join(Membership.Role.values)}.", field="role"
        )
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_INVITE_DAYS:
        raise LabelingError(
            f"An invite lasts 1 to {MAX_INVITE_DAYS} days, not {days!r}.", field="days"
        )
    raw = secrets.token_urlsafe(32)
    invite = Invite.objects.create(
        project=project,
        role=role,
        token_hash=token_hash(raw),
        created_by=created_by,
        expires_at=timezone.now() + timedelta(days=days),
    )
    return InviteCreated(invite=invite, token=raw)


def invite_revoke(*, project: Project, invite_id) -> None:
    """Delete an unused invite of the project: its link stops working."""
    invite_pk = as_id(invite_id)
    deleted = (
        invite_pk is not None
        and Invite.objects.filter(project=project, pk=invite_pk, used_at__isnull=True).delete()[0]
    )
    if not deleted:
        raise InviteNotFound(f"Invite {invite_id} does not exist or was used already.")


def invite_for_token(*, token: str) -> Invite:
    """The open invite a link's token names; InviteNotFound when unknown, used or expired."""
    invite = (
        Invite.objects.filter(token_hash=token_hash(token or "")).select_related("project").first()
    )
    _invite_check_open(invite)
    return invite


def _invite_check_open(invite: Invite | None) -> None:
    if invite is None or invite.used_at is not None or invite.expires_at <= timezone.now():
        raise InviteNotFound(
            "This invite link is not valid: it was used already, it expired or it was revoked. "
            "Ask the project's admin for a new one."
        )


def invite_accept(*, token: str, username: str, password: str):
    """Create the account the invite allows and add it to the project; the invite is used up
    in the same transaction (its row lock makes two uses at once one)."""
    with transaction.atomic():
        invite = (
            Invite.objects.select_for_update()
            .filter(token_hash=token_hash(token or ""))
            .select_related("project")
            .first()
        )
        _invite_check_open(invite)
        user = _user_create(username=username, password=password)
        membership_set(project=invite.project, user=user, role=invite.role)
        invite.used_at = timezone.now()
        invite.used_by = user
        invite.save(update_fields=["used_at", "used_by"])
    return user


# --------------------------------------------------------------------------- prompts and items


def prompt_create(
    *, project: Project, text: str, messages: list | None = None, metadata: dict | None = None
) -> Prompt:
    """A prompt: text, or a conversation (rlhf.conversations rules; ending with a user turn)
    whose text defaults to its "role: content" rendering."""
    if messages is not None:
        try:
            conversation_check(messages)
        except ConversationError as exc:
            raise LabelingError(f"Chat messages: {exc}.") from None
    if not isinstance(text, str) or not text.strip():
        if not messages:
            raise LabelingError("A prompt needs text or chat messages.")
        text = conversation_text(messages)
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
    # Sampled text can decode to a NUL byte, which PostgreSQL cannot store: it is shown as the
    # replacement character instead (imports refuse NUL before they get here).
    return Completion.objects.create(
        prompt=prompt,
        text=text.replace("\x00", "\ufffd"),
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
    """An item shows exactly `completions` (MIN_K to MAX_K distinct completions of `prompt`)."""
    if prompt.project_id != project.pk:
        raise LabelingError(f"Prompt {prompt.pk} belongs to another project.")
    if source not in Item.Source.values:
        raise LabelingError(f"Unknown item source {source!r}.")
    ids = [c.pk for c in completions]
    if not k_in_range(len(ids)):
        raise LabelingError(f"An item shows {MIN_K} to {MAX_K} completions, not {len(ids)}.")
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


# The statements every new lease runs, written out once rather than built by the ORM on each
# call (building these subquery-heavy querysets cost more CPU than the database spends
# running them). Plain SQL that PostgreSQL and SQLite both accept; {lock} is
# FOR UPDATE [SKIP LOCKED] where the database has it (SQLite serialises writers instead).
# The candidate filter is one NOT (... OR ...) rather than two NOT EXISTS: PostgreSQL then
# walks item_queue_idx in id order and stops at the first free item (the user's own leases
# and rankings become small hashed sets), where two NOT EXISTS become anti-joins that read
# every lease of the project before the candidate, which grows with the queue's history.
# An item with room for one more labeler (live leases + rankings < %s) that this user was
# never handed and never ranked; shared by the two candidate queries below.
_ROOM_FOR_USER_SQL = """
  AND i.ranking_count + (
      SELECT COUNT(*) FROM {assignment} a
      WHERE a.item_id = i.id AND a.status = %s AND a.expires_at > %s) < %s
  AND NOT (EXISTS (SELECT 1 FROM {assignment} a WHERE a.item_id = i.id AND a.user_id = %s)
        OR EXISTS (SELECT 1 FROM {ranking} r WHERE r.item_id = i.id AND r.user_id = %s))
"""
_CANDIDATE_SQL = (
    """
SELECT i.id FROM {item} i
WHERE i.project_id = %s AND NOT i.is_complete AND i.source IN ({sources})"""
    + _ROOM_FOR_USER_SQL
    + """  {skip}
ORDER BY i.id LIMIT 1 {lock}
"""
)
# With disagreement routing on (labeling.routing), asked first: the routed item (the reward
# model disagrees with the labelers, or is least sure) of lowest priority that has room for
# one more of the project's routed labelers, whether or not its first quota is met. A small
# set read through itemscore_routed_idx; when none is free the usual candidate follows.
_ROUTED_SQL = (
    """
SELECT i.id FROM {item_score} s JOIN {item} i ON i.id = s.item_id
WHERE s.project_id = %s AND s.routed AND i.source IN ({sources})"""
    + _ROOM_FOR_USER_SQL
    + """  {skip}
ORDER BY s.priority, s.item_id LIMIT 1 {lock}
"""
)
# Under the candidate's lock, in a new statement: its counts and completion ids.
_RECOUNT_SQL = """
SELECT ic.completion_id, it.ranking_count,
  (SELECT COUNT(*) FROM {assignment} a
   WHERE a.item_id = %s AND a.status = %s AND a.expires_at > %s),
  (SELECT COUNT(*) FROM {assignment} a
   WHERE a.item_id = %s AND a.status = %s AND a.expires_at <= %s),
  EXISTS (SELECT 1 FROM {assignment} a WHERE a.item_id = %s AND a.user_id = %s)
FROM {item_completion} ic JOIN {item} it ON it.id = ic.item_id
WHERE ic.item_id = %s
ORDER BY ic.position
"""

# The user's oldest live lease in the project (the assignment_user_live_idx index).
_OWN_LEASE_SQL = """
SELECT a.* FROM {assignment} a JOIN {item} it ON it.id = a.item_id
WHERE a.user_id = %s AND a.status = %s AND a.expires_at > %s AND it.project_id = %s {skip}
ORDER BY a.created_at, a.id LIMIT 1
"""

_TABLES = {
    "item": Item._meta.db_table,
    "assignment": Assignment._meta.db_table,
    "ranking": Ranking._meta.db_table,
    "item_completion": ItemCompletion._meta.db_table,
    "project": Project._meta.db_table,
    "membership": Membership._meta.db_table,
    "item_score": ItemScore._meta.db_table,
}


def _candidate_sql(*, skip: int, wait: bool) -> str:
    """The candidate query excluding `skip` item ids; `wait`: lock without SKIP LOCKED."""
    features = connection.features
    lock = ""
    if features.has_select_for_update:
        skip_locked = features.has_select_for_update_skip_locked and not wait
        lock = "FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE"
    return _CANDIDATE_SQL.format(
        **_TABLES,
        sources=", ".join(["%s"] * len(QUEUE_SOURCES)),
        skip=f"AND i.id NOT IN ({', '.join(['%s'] * skip)})" if skip else "",
        lock=lock,
    )


def _routed_sql(*, skip: int) -> str:
    """The routed-candidate query excluding `skip` item ids (never waits on a lock)."""
    features = connection.features
    lock = ""
    if features.has_select_for_update_of and features.has_select_for_update_skip_locked:
        lock = "FOR UPDATE OF i SKIP LOCKED"
    return _ROUTED_SQL.format(
        **_TABLES,
        sources=", ".join(["%s"] * len(QUEUE_SOURCES)),
        skip=f"AND i.id NOT IN ({', '.join(['%s'] * skip)})" if skip else "",
        lock=lock,
    )


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
    - With the project's `route_disagreements` on, routed items (labeling.routing: the reward
      model disagrees with the labelers' consensus, or its margin is among the smallest) go
      first, lowest priority first, until each has `routed_annotations_per_item` labelers.

    Statements for a new lease: the own-lease lookup, then in one transaction one query that
    finds and locks a candidate (SKIP LOCKED), one that recounts it under the lock and reads
    its completion ids, and the INSERT (plus an UPDATE only when expired leases are found).
    """
    if exclude_item_id is not None:  # an id no item can have excludes nothing
        exclude_item_id = as_id(exclude_item_id)
    now = timezone.now()
    db_now = connection.ops.adapt_datetimefield_value(now)
    own_params = [user.pk, Assignment.Status.ACTIVE.value, db_now, project.pk]
    if exclude_item_id is not None:
        own_params.append(exclude_item_id)
    own = list(
        Assignment.objects.raw(
            _OWN_LEASE_SQL.format(
                **_TABLES, skip="" if exclude_item_id is None else "AND a.item_id <> %s"
            ),
            own_params,
        )
    )
    if own:
        return own[0]

    params = [
        project.pk,
        *QUEUE_SOURCES,
        Assignment.Status.ACTIVE.value,
        db_now,
        project.annotations_per_item,
        user.pk,
        user.pk,
    ]
    skip: list[int] = [] if exclude_item_id is None else [exclude_item_id]
    routed_target = max(project.annotations_per_item, project.routed_annotations_per_item)
    for _ in range(_MAX_ROUNDS):
        with transaction.atomic(), connection.cursor() as cursor:
            row = None
            if project.route_disagreements:  # one statement more only when none is free
                routed_params = [*params[:-3], routed_target, *params[-2:], *skip]
                cursor.execute(_routed_sql(skip=len(skip)), routed_params)
                row = cursor.fetchone()
            target = project.annotations_per_item if row is None else routed_target
            if row is None:
                # Lock a candidate nobody else holds: labelers skip each other's items, not wait.
                cursor.execute(_candidate_sql(skip=len(skip), wait=False), [*params, *skip])
                row = cursor.fetchone()
            if row is None:
                # Every item with room is locked by another labeler this instant (a short
                # transaction): wait for the first one, then recount it.
                cursor.execute(_candidate_sql(skip=len(skip), wait=True), [*params, *skip])
                row = cursor.fetchone()
            if row is None:
                return None
            item_id = row[0]
            skip.append(item_id)
            lease = _lease_if_room(
                item_id=item_id, user=user, project=project, now=now, target=target
            )
            if lease is not None:
                return lease
    return None


def _lease_if_room(
    *, item_id: int, user, project: Project, now, target: int | None = None
) -> Assignment | None:
    """With the item's row locked: recount in a new statement (so every lease and ranking
    committed by whoever held the lock before us is visible: under READ COMMITTED the query
    that took the lock may have counted from an older snapshot), reclaim expired leases,
    lease if room. Every lease of this item is created under this lock, so the checks below
    cannot race. One statement reads the counts and the item's completion ids together.
    `target`: the labelers the item may have (a routed item's are more than the project's)."""
    db_now = connection.ops.adapt_datetimefield_value(now)
    active = Assignment.Status.ACTIVE.value
    with connection.cursor() as cursor:
        cursor.execute(
            _RECOUNT_SQL.format(**_TABLES),
            [item_id, active, db_now, item_id, active, db_now, item_id, user.pk, item_id],
        )
        rows = cursor.fetchall()
    if not rows:
        return None
    _, ranking_count, live_count, stale_count, mine = rows[0]
    if target is None:
        target = project.annotations_per_item
    if mine or ranking_count + live_count >= target:
        return None
    if stale_count:
        Assignment.objects.filter(
            item_id=item_id, status=Assignment.Status.ACTIVE, expires_at__lte=now
        ).update(status=Assignment.Status.EXPIRED)
    completion_ids = [row[0] for row in rows]
    return Assignment.objects.create(
        item_id=item_id,
        user=user,
        status=Assignment.Status.ACTIVE,
        display_order=_rng.sample(completion_ids, len(completion_ids)),
        expires_at=now + timedelta(seconds=project.lease_seconds),
    )


def _item_for_member(*, user, item_id, lock: bool = False) -> Item:
    item_pk = as_id(item_id)
    if item_pk is None:
        raise ItemNotFound(f"{item_id!r} is not an item id.")
    qs = Item.objects.filter(pk=item_pk)
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
    """Check that `groups` (best first; a group of several ids is a tie) ranks each of
    `completion_ids` exactly once (rlhf.rankings.ranking_check; ids may come as digit
    strings). Returns the groups as lists of ints."""
    if isinstance(groups, list | tuple):
        groups = [
            [int(c) if isinstance(c, str) and c.isdecimal() else c for c in g]
            if isinstance(g, list | tuple)
            else g
            for g in groups
        ]
    try:
        clean = ranking_check(groups, completion_ids, noun="id")
    except RankingError as exc:
        message = str(exc)
        if item_id is None:
            raise InvalidRanking(f"{message[0].upper()}{message[1:]}.") from None
        raise InvalidRanking(f"Item {item_id}: {message}.") from None
    if not allow_ties and any(len(g) > 1 for g in clean):
        raise InvalidRanking("This project does not allow ties: give each response its own rank.")
    return clean


def _ranking_notes_clean(rationale, seconds_spent) -> tuple[str, float | None]:
    """A ranking's rationale (stripped, at most 10,000 characters) and seconds spent."""
    if seconds_spent is not None:
        try:
            seconds_spent = float(seconds_spent)
        except (TypeError, ValueError):
            raise LabelingError("seconds_spent must be a number.", field="seconds_spent") from None
        if not 0 <= seconds_spent < 10**7:
            raise LabelingError(
                "seconds_spent must be a non-negative number of seconds.", field="seconds_spent"
            )
    if rationale is not None and not isinstance(rationale, str):
        raise LabelingError("The rationale must be text.", field="rationale")
    rationale = _no_nul((rationale or "").strip(), "rationale")
    if len(rationale) > 10_000:
        raise LabelingError("The rationale is limited to 10,000 characters.", field="rationale")
    return rationale, seconds_spent


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

    Statements on the usual path: one query that locks the item and reads the user's lease,
    the item's count and the project's rules (and checks membership); a compare-and-set
    UPDATE of the lease (active/expired -> submitted: of two concurrent submits exactly one
    changes the row, the other returns the first one's ranking); the INSERT; the item's
    counter UPDATE. The completion ids come from the lease's display order (a permutation of
    the item's completions, fixed once the item exists); the database trigger of migration
    0002 still checks every ranking against the item's rows.
    """
    rationale, seconds_spent = _ranking_notes_clean(rationale, seconds_spent)
    item_pk = as_id(item_id)
    if item_pk is None:
        raise ItemNotFound(f"{item_id!r} is not an item id.")

    try:
        with transaction.atomic():
            return _ranking_store(
                user=user,
                item_pk=item_pk,
                groups=groups,
                rationale=rationale,
                seconds_spent=seconds_spent,
                display_order=display_order,
            )
    except IntegrityError:
        # Only a writer that bypassed the item lock can get here: the unique constraint
        # caught a second ranking of the same item by the same user (keep the first), or
        # the coverage trigger refused groups the lease's display order let through.
        existing = Ranking.objects.filter(item_id=item_pk, user=user).first()
        if existing is not None:
            return existing
        allow_ties = (
            Item.objects.filter(pk=item_pk).values_list("project__allow_ties", flat=True).first()
        )
        ranking_validate(
            groups=groups,
            completion_ids=_completion_ids(item_pk),
            allow_ties=bool(allow_ties),
            item_id=item_pk,
        )
        raise


def _completion_ids(item_id: int) -> list[int]:
    return list(
        ItemCompletion.objects.filter(item_id=item_id)
        .order_by("position")
        .values_list("completion_id", flat=True)
    )


# ranking_submit's first statement: the user's lease on the item with the item's count and
# the project's rules, locking the item's row (FOR UPDATE OF it on PostgreSQL; SQLite
# serialises writers instead); a non-member gets no row (unless a superuser).
_SUBMIT_LOCK_SQL = """
SELECT a.id, a.status, a.display_order, a.expires_at, it.ranking_count,
       p.annotations_per_item, p.allow_ties
FROM {assignment} a
JOIN {item} it ON it.id = a.item_id
JOIN {project} p ON p.id = it.project_id
WHERE a.item_id = %s AND a.user_id = %s {member}
{lock}
"""
_SUBMIT_MEMBER_SQL = (
    "AND EXISTS (SELECT 1 FROM {membership} m WHERE m.project_id = p.id AND m.user_id = %s)"
)


@dataclass
class _LockedLease:
    pk: int
    status: str
    display_order: list[int]
    expires_at: object
    ranking_count: int
    annotations_per_item: int
    allow_ties: bool

    def __post_init__(self):
        # Raw rows: JSON arrives as text, on SQLite a datetime as naive UTC, a boolean as 0/1.
        if isinstance(self.display_order, str):
            self.display_order = json.loads(self.display_order)
        self.display_order = [int(c) for c in self.display_order]
        if isinstance(self.expires_at, str):
            self.expires_at = parse_datetime(self.expires_at)
        if timezone.is_naive(self.expires_at):
            self.expires_at = timezone.make_aware(self.expires_at, UTC)
        self.allow_ties = bool(self.allow_ties)


def _ranking_store(
    *, user, item_pk: int, groups, rationale: str, seconds_spent, display_order
) -> Ranking:
    """`ranking_submit` inside its transaction."""
    with connection.cursor() as cursor:
        cursor.execute(
            _SUBMIT_LOCK_SQL.format(
                **_TABLES,
                member="" if user.is_superuser else _SUBMIT_MEMBER_SQL.format(**_TABLES),
                lock="FOR UPDATE OF it" if connection.features.has_select_for_update_of else "",
            ),
            [item_pk, user.pk] if user.is_superuser else [item_pk, user.pk, user.pk],
        )
        row = cursor.fetchone()
    assignment = None if row is None else _LockedLease(*row)
    if assignment is None:
        # Not a member (404), or a member without a lease (409); an old ranking without a
        # lease (none is made that way today) is returned as a double submit would be.
        item = _item_for_member(user=user, item_id=item_pk, lock=True)
        existing = Ranking.objects.filter(item=item, user=user).first()
        if existing is not None:
            return existing
        raise NotAssigned(
            f"Item {item.pk} was not handed to you; reload the page to get your next item."
        )
    # The item row is locked, so its ranking_count is current. The lease's own columns were
    # read with the statement's snapshot and may predate a concurrent submit or skip: the
    # compare-and-set below decides.
    if assignment.status == Assignment.Status.SUBMITTED:
        return _ranking_already_stored(item_pk=item_pk, user=user)
    if assignment.status == Assignment.Status.SKIPPED:
        raise NotAssigned(f"You skipped item {item_pk}; it cannot be ranked any more.")
    now = timezone.now()
    if assignment.status == Assignment.Status.EXPIRED or assignment.expires_at <= now:
        others_live = (
            Assignment.objects.filter(_live(now), item_id=item_pk).exclude(pk=assignment.pk).count()
        )
        if assignment.ranking_count + others_live >= assignment.annotations_per_item:
            raise LeaseExpired(
                f"Your lease on item {item_pk} expired and the item went to other labelers; "
                "reload the page to get your next item."
            )
    claimed = Assignment.objects.filter(
        pk=assignment.pk, status__in=[Assignment.Status.ACTIVE, Assignment.Status.EXPIRED]
    ).update(status=Assignment.Status.SUBMITTED)
    if not claimed:
        # A concurrent submit (a double click) or a skip changed the lease first.
        status = Assignment.objects.filter(pk=assignment.pk).values_list("status", flat=True)
        if status.first() == Assignment.Status.SUBMITTED:
            return _ranking_already_stored(item_pk=item_pk, user=user)
        raise NotAssigned(f"You skipped item {item_pk}; it cannot be ranked any more.")

    completion_ids = list(assignment.display_order)
    try:
        clean = ranking_validate(
            groups=groups,
            completion_ids=completion_ids,
            allow_ties=assignment.allow_ties,
            item_id=item_pk,
        )
    except InvalidRanking:
        # Word the error from the item's own rows (the lease's order should match them).
        stored = _completion_ids(item_pk)
        if sorted(stored) == sorted(completion_ids):
            raise
        completion_ids = stored
        clean = ranking_validate(
            groups=groups,
            completion_ids=completion_ids,
            allow_ties=assignment.allow_ties,
            item_id=item_pk,
        )
    shown = list(assignment.display_order)
    if display_order is not None:
        try:
            client_order = [int(c) for c in display_order]
        except (TypeError, ValueError):
            client_order = None
        if client_order is not None and sorted(client_order) == sorted(completion_ids):
            shown = client_order
    ranking = Ranking.objects.create(
        item_id=item_pk,
        user=user,
        source=Ranking.Source.LABELER,
        groups=clean,
        rationale=rationale,
        seconds_spent=seconds_spent,
        display_order=shown,
    )
    Item.objects.filter(pk=item_pk).update(
        ranking_count=F("ranking_count") + 1,
        is_complete=assignment.ranking_count + 1 >= assignment.annotations_per_item,
    )
    return ranking


def _ranking_already_stored(*, item_pk: int, user) -> Ranking:
    existing = Ranking.objects.filter(item_id=item_pk, user=user).first()
    if existing is None:  # a lease is marked submitted in the transaction that stores it
        raise NotAssigned(f"Item {item_pk} has no ranking of yours; reload the page.")
    return existing


RANKING_REVISE_DAYS = 7
"""A labeler may replace their own ranking for this many days after first submitting it."""


class RevisionClosed(LabelingError):
    """The ranking is older than the revision window."""

    status_code = 409
    code = "revision_closed"


def ranking_revise(
    *, user, item_id, groups, rationale: str = "", seconds_spent: float | None = None
) -> Ranking:
    """Replace `user`'s own ranking of an item with `groups`. The latest version counts: the
    Ranking row is updated in place (same id), so exports, agreement and the next training
    snapshot take it; the version it replaces is kept as a RankingRevision. Allowed for
    RANKING_REVISE_DAYS days after the first submit, while the user is still a member.
    `seconds_spent` is added to the time already spent on the item. Sending the same groups
    (the members of a tie in any order) and rationale stores nothing, not even the time: the
    returned ranking's `changed` is False then, True when a revision was stored. A new
    rationale alone is a revision: it is part of what is stored."""
    rationale, seconds_spent = _ranking_notes_clean(rationale, seconds_spent)
    with transaction.atomic():
        item = _item_for_member(user=user, item_id=item_id)
        ranking = (
            Ranking.objects.select_for_update()
            .filter(item=item, user=user, source=Ranking.Source.LABELER)
            .first()
        )
        if ranking is None:
            raise ItemNotFound(
                f"You have not ranked item {item.pk}, so there is nothing to revise."
            )
        if ranking.created_at < timezone.now() - timedelta(days=RANKING_REVISE_DAYS):
            raise RevisionClosed(
                f"Your ranking of item {item.pk} is older than {RANKING_REVISE_DAYS} days and "
                "can no longer be revised."
            )
        clean = ranking_validate(
            groups=groups,
            completion_ids=_completion_ids(item.pk),
            allow_ties=item.project.allow_ties,
            item_id=item.pk,
        )
        if _same_ranking(clean, ranking.groups) and _same_text(rationale, ranking.rationale):
            ranking.changed = False
            return ranking
        RankingRevision.objects.create(
            ranking=ranking,
            groups=ranking.groups,
            rationale=ranking.rationale,
            seconds_spent=ranking.seconds_spent,
            submitted_at=ranking.revised_at or ranking.created_at,
        )
        ranking.groups = clean
        ranking.rationale = rationale
        if seconds_spent is not None:
            ranking.seconds_spent = (ranking.seconds_spent or 0) + seconds_spent
        ranking.revised_at = timezone.now()
        ranking.save(update_fields=["groups", "rationale", "seconds_spent", "revised_at"])
    ranking.changed = True
    return ranking


def _same_ranking(a: list[list[int]], b: list[list[int]]) -> bool:
    """The same ranks holding the same completions (a tie's members in any order)."""
    return [sorted(g) for g in a] == [sorted(g) for g in b]


def _same_text(a: str, b: str) -> bool:
    """The same text once line ends are alike (a browser sends a textarea's as \n)."""
    return (a or "").replace("\r\n", "\n") == (b or "").replace("\r\n", "\n")


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


def item_flag(*, user, item_id, reason: str = "", category: str = Flag.Category.OTHER) -> Flag:
    """Report a problem with an item (shown on the admin dashboard, grouped by category) and
    give it back. `category` is one of Flag.Category; `reason` is free text, required for
    "other". A labeler flags items handed to them; project admins flag any item of their
    projects."""
    if category not in Flag.Category.values:
        raise LabelingError(
            f"Unknown flag category {category!r}; use one of {', '.join(Flag.Category.values)}.",
            field="category",
        )
    if reason is not None and not isinstance(reason, str):
        raise LabelingError("The reason must be text.", field="reason")
    reason = _no_nul((reason or "").strip(), "reason")
    if not reason and category == Flag.Category.OTHER:
        raise LabelingError("Say what is wrong with the item (or pick a category).", field="reason")
    if len(reason) > 2000:
        raise LabelingError("The reason is limited to 2,000 characters.", field="reason")
    with transaction.atomic():
        # the item's row lock makes two reports at once (a double click) one flag
        item = _item_for_member(user=user, item_id=item_id, lock=True)
        if not (
            user.is_superuser
            or Assignment.objects.filter(item=item, user=user).exists()
            or Membership.objects.filter(
                project_id=item.project_id, user=user, role=Membership.Role.ADMIN
            ).exists()
        ):
            raise NotAssigned(f"Item {item.pk} was not handed to you, so you cannot flag it.")
        # one open flag per person and item: a repeated report (a double click) is the same one
        flag = Flag.objects.filter(item=item, user=user, resolved=False).first()
        if flag is None:
            flag = Flag.objects.create(item=item, user=user, category=category, reason=reason)
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
            f"{self.project.items.filter(source=Item.Source.QUEUE).count()} items to rank and "
            "a reference ranking per prompt."
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
    from labeling.demo_data import DEMO_INSTRUCTIONS, DEMO_PROMPTS, DEMO_REFERENCE_RANKING

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
            completions = [
                completion_create(prompt=prompt, text=text, model_name="demo")
                for text in entry["completions"]
            ]
            items_create_for_prompt(project=project, prompt=prompt)
            # The author's reference ranking, stored as an import on an item of its own (not in
            # the labeling queue), so a reward-model job can be launched before anyone labels.
            reference = item_create(
                project=project, prompt=prompt, completions=completions, source=Item.Source.IMPORT
            )
            Item.objects.filter(pk=reference.pk).update(is_complete=True)
            Ranking.objects.create(
                item=reference,
                source=Ranking.Source.IMPORT,
                groups=indices_to_ids(DEMO_REFERENCE_RANKING, [c.pk for c in completions]),
            )
    return DemoSeedResult(created=True, project=project, passwords=passwords)
