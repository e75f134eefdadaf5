"""The labeling JSON API (django-ninja), mounted at /api/ with the schema at /api/openapi.json
and interactive docs at /api/docs.

Authentication (labeling.auth): `Authorization: Bearer <token>` for scripts (no CSRF: no
cookie is involved), or the browser session, whose unsafe requests must carry the CSRF
token (X-CSRFToken header). Every lookup is scoped to the caller's projects: anything
else is a 404, so a labeler cannot learn that another project or item exists.

Errors: {"detail": message, "code": ...} with the status of the labeling rule that refused
(400 invalid, 404 not found, 409 stale lease), as raised by labeling.services; 413 for an
import over IMPORT_MAX_BYTES; 422 (pydantic's list of errors) for a malformed request.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.http import StreamingHttpResponse
from django.urls import reverse
from django.utils import timezone
from ninja import File, Form, Router, Schema
from ninja.files import UploadedFile
from ninja.responses import Status
from pydantic import StrictBool, StrictInt

from config.ids import Id
from config.schemas import INVALID
from labeling import routing, selectors, services
from labeling.auth import api_token_create, api_token_revoke, api_tokens_for_user, token_hash
from labeling.importexport import (
    EXPORT_KINDS,
    FORMATS,
    ImportFileError,
    ImportTooLarge,
    export_jsonl,
    import_file,
)
from labeling.models import ApiToken
from labeling.services import LabelingError
from labeling.templatetags.labeling_markdown import markdown_to_safe_html

router = Router(tags=["labeling"])


# --------------------------------------------------------------------------- schemas


class ErrorOut(Schema):
    detail: str
    code: str = "invalid"
    line: int | None = None
    field: str | None = None


class ProjectOut(Schema):
    id: int
    name: str
    instructions: str
    k: int
    annotations_per_item: int
    allow_ties: bool
    role: str | None
    total_items: int
    complete_items: int
    my_done: int


class ProgressOut(Schema):
    total: int
    complete: int
    remaining: int
    imported: int
    percent: float
    rankings: int
    flags: int


class ProjectDetailOut(Schema):
    id: int
    name: str
    instructions: str
    instructions_html: str
    k: int
    annotations_per_item: int
    allow_ties: bool
    lease_seconds: int
    role: str
    is_admin: bool
    my_done: int
    progress: ProgressOut


class ProjectPatchIn(Schema):
    """The settings to change; those left out stay as they are."""

    name: str | None = None
    instructions: str | None = None
    k: StrictInt | None = None
    annotations_per_item: StrictInt | None = None
    allow_ties: StrictBool | None = None
    lease_seconds: StrictInt | None = None


class CompletionOut(Schema):
    id: int
    text: str
    html: str | None = None


class PromptOut(Schema):
    id: int
    text: str
    messages: list[dict] | None
    html: str | None = None


class ItemOut(Schema):
    id: int
    project_id: int
    prompt: PromptOut
    completions: list[CompletionOut]
    display_order: list[int]
    lease_expires_at: datetime


class NextIn(Schema):
    exclude_item_id: Id | None = None
    html: bool = False


class NextOut(Schema):
    item: ItemOut | None


class RankingIn(Schema):
    groups: list[list[Id]]
    rationale: str = ""
    seconds_spent: float | None = None
    display_order: list[Id] | None = None


class RankingOut(Schema):
    id: int
    item_id: int
    groups: list[list[int]]
    rationale: str
    seconds_spent: float | None
    display_order: list[int]
    created_at: datetime
    revised_at: datetime | None = None


class MyRankingOut(RankingOut):
    earlier_versions: int
    revisable: bool


class RevisionIn(Schema):
    groups: list[list[Id]]
    rationale: str = ""
    seconds_spent: float | None = None


class SkipOut(Schema):
    item_id: int
    status: str


class FlagIn(Schema):
    category: str = "other"
    reason: str = ""


class FlagOut(Schema):
    id: int
    item_id: int
    category: str
    reason: str


class FlagInfoOut(FlagOut):
    user: str
    resolved: bool
    created_at: datetime


class FlagCountOut(Schema):
    category: str
    label: str
    count: int


class FlagsOut(Schema):
    categories: list[FlagCountOut]
    flags: list[FlagInfoOut]


class PositionBiasOut(Schema):
    rankings: int
    first_ranked_best: int
    rate: float | None
    chance: float | None
    p_value: float | None


class LengthPreferenceOut(Schema):
    pairs: int
    longer_preferred: int
    rate: float | None
    p_value: float | None


class AgreementOut(Schema):
    items: int
    agreement: float | None
    kendall_tau: float | None


class PeerAgreementOut(AgreementOut):
    user_id: int
    username: str


class LabelerReportOut(Schema):
    user_id: int
    username: str
    rankings: int
    median_seconds: float | None
    skips: int
    flags: int
    position_bias: PositionBiasOut
    length_preference: LengthPreferenceOut
    consensus: AgreementOut
    labelers: list[PeerAgreementOut]
    flagged: bool
    reasons: list[str]


class DisagreementCompletionOut(Schema):
    id: int
    text: str
    reward: float | None
    consensus_rank: int


class DisagreementItemOut(Schema):
    item_id: int
    prompt: str
    rankings: int
    agreement: float | None
    margin: float
    routed: bool
    checkpoint_id: int | None
    completions: list[DisagreementCompletionOut]


class DisagreementsOut(Schema):
    route_disagreements: bool
    routed_annotations_per_item: int
    scored: int
    disagree: int
    routed: int
    items: list[DisagreementItemOut]


class RoutingIn(Schema):
    route_disagreements: bool
    routed_annotations_per_item: int | None = None


class ImportOut(Schema):
    format: str
    records: int
    prompts: int
    completions: int
    items: int
    rankings: int


class TokenIn(Schema):
    name: str = ""


class TokenInfoOut(Schema):
    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None


class TokenOut(Schema):
    id: int
    name: str
    token: str


ERRORS = {400: ErrorOut, 404: ErrorOut, 409: ErrorOut, **INVALID}


def _refused(e: LabelingError) -> Status:
    body = {"detail": e.message, "code": e.code}
    if e.field:
        body["field"] = e.field
    return Status(e.status_code, body)


# --------------------------------------------------------------------------- projects


@router.get("/projects", response=list[ProjectOut], summary="The projects you belong to")
def project_list(request):
    return list(selectors.project_list_for_user(user=request.auth))


def _project_detail(project, user) -> dict:
    return {
        "id": project.pk,
        "name": project.name,
        "instructions": project.instructions,
        "instructions_html": markdown_to_safe_html(project.instructions),
        "k": project.k,
        "annotations_per_item": project.annotations_per_item,
        "allow_ties": project.allow_ties,
        "lease_seconds": project.lease_seconds,
        "role": project.role,
        "is_admin": project.is_admin,
        "my_done": selectors.labeler_done_count(project=project, user=user),
        "progress": selectors.project_progress(project=project),
    }


@router.get("/projects/{project_id}", response={200: ProjectDetailOut, 404: ErrorOut, **INVALID})
def project_detail(request, project_id: int):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id)
    return _project_detail(project, request.auth)


@router.patch(
    "/projects/{project_id}",
    response={200: ProjectDetailOut, 400: ErrorOut, 404: ErrorOut, **INVALID},
    summary="Change a project's settings (project admins); K only while it has no items",
    description="Send only the settings to change. A refusal is a 400 naming the `field`.",
)
def project_update(request, project_id: int, payload: ProjectPatchIn):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    changes = payload.model_dump(exclude_unset=True)
    for key, value in changes.items():
        if value is None and key != "instructions":
            return Status(
                400, {"detail": f"{key} cannot be null.", "code": "invalid", "field": key}
            )
    try:
        services.project_update(project=project, **changes)
    except LabelingError as e:
        return _refused(e)
    return _project_detail(project, request.auth)


@router.post(
    "/projects/{project_id}/next",
    response={200: NextOut, **ERRORS},
    summary="Lease the next item to rank ({item: null} when none is left)",
)
def item_next(request, project_id: int, payload: NextIn | None = None):
    payload = payload or NextIn()
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id)
    try:
        lease = services.assignment_next(
            project=project, user=request.auth, exclude_item_id=payload.exclude_item_id
        )
    except LabelingError as e:
        return _refused(e)
    if lease is None:
        return {"item": None}
    view = selectors.assignment_view(assignment=lease)
    prompt = view["prompt"]
    return {
        "item": {
            "id": view["item"].pk,
            "project_id": project.pk,
            "prompt": {
                "id": prompt.pk,
                "text": prompt.text,
                "messages": prompt.messages,
                "html": markdown_to_safe_html(prompt.text) if payload.html else None,
            },
            "completions": [
                {
                    "id": c.pk,
                    "text": c.text,
                    "html": markdown_to_safe_html(c.text) if payload.html else None,
                }
                for c in view["completions"]
            ],
            "display_order": view["display_order"],
            "lease_expires_at": lease.expires_at,
        }
    }


# --------------------------------------------------------------------------- items


@router.post(
    "/items/{item_id}/ranking",
    response={200: RankingOut, **ERRORS},
    summary="Submit your ranking: groups of completion ids, best first (a group is a tie)",
)
def ranking_submit(request, item_id: int, payload: RankingIn):
    try:
        return services.ranking_submit(
            user=request.auth,
            item_id=item_id,
            groups=payload.groups,
            rationale=payload.rationale,
            seconds_spent=payload.seconds_spent,
            display_order=payload.display_order,
        )
    except LabelingError as e:
        return _refused(e)


@router.put(
    "/items/{item_id}/ranking",
    response={200: RankingOut, **ERRORS},
    summary="Revise your ranking: the new groups replace it and count from now on",
    description="Allowed for a few days after the first submit (409 `revision_closed` after). "
    "The ranking keeps its id; the version it replaces is kept as history and no longer "
    "counts (exports, agreement, training snapshots).",
)
def ranking_revise(request, item_id: int, payload: RevisionIn):
    try:
        return services.ranking_revise(
            user=request.auth,
            item_id=item_id,
            groups=payload.groups,
            rationale=payload.rationale,
            seconds_spent=payload.seconds_spent,
        )
    except LabelingError as e:
        return _refused(e)


@router.get(
    "/projects/{project_id}/my-rankings",
    response={200: list[MyRankingOut], 404: ErrorOut, **INVALID},
    summary="Your recent rankings in the project, newest first, and whether each can be revised",
)
def my_rankings(request, project_id: int):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id)
    since = timezone.now() - timedelta(days=services.RANKING_REVISE_DAYS)
    rankings = selectors.rankings_recent_for_user(project=project, user=request.auth)
    for ranking in rankings:
        ranking.revisable = ranking.created_at >= since
    return rankings


@router.post("/items/{item_id}/skip", response={200: SkipOut, **ERRORS})
def item_skip(request, item_id: int):
    try:
        assignment = services.item_skip(user=request.auth, item_id=item_id)
    except LabelingError as e:
        return _refused(e)
    return {"item_id": assignment.item_id, "status": assignment.status}


@router.post("/items/{item_id}/flag", response={200: FlagOut, **ERRORS})
def item_flag(request, item_id: int, payload: FlagIn):
    try:
        flag = services.item_flag(
            user=request.auth, item_id=item_id, reason=payload.reason, category=payload.category
        )
    except LabelingError as e:
        return _refused(e)
    return flag


@router.get(
    "/projects/{project_id}/flags",
    response={200: FlagsOut, 404: ErrorOut, **INVALID},
    summary="Open flags with their counts per category (project admins); `category` narrows",
)
def flag_list(request, project_id: int, category: str | None = None):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    flags = selectors.flagged_items(project=project, category=category)
    return {
        "categories": selectors.flag_counts_by_category(project=project),
        "flags": [
            {
                "id": f.pk,
                "item_id": f.item_id,
                "category": f.category,
                "reason": f.reason,
                "user": f.user.username,
                "resolved": f.resolved,
                "created_at": f.created_at,
            }
            for f in flags[:500]
        ],
    }


@router.get(
    "/projects/{project_id}/labelers",
    response={200: list[LabelerReportOut], 404: ErrorOut, **INVALID},
    summary="Per-labeler report (project admins): position bias, length preference, "
    "agreement with the consensus and with each labeler, time, skips, flags",
    description="A labeler whose pattern stands out has `flagged` true and `reasons` in plain "
    "words (labeling.selectors.labeler_report says when).",
)
def labeler_report(request, project_id: int):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    return selectors.labeler_report(project=project)


def _disagreements(project) -> dict:
    return {
        "route_disagreements": project.route_disagreements,
        "routed_annotations_per_item": project.routed_annotations_per_item,
        **selectors.item_disagreements(project=project),
    }


@router.get(
    "/projects/{project_id}/disagreements",
    response={200: DisagreementsOut, 404: ErrorOut, **INVALID},
    summary="Items where the reward model and the labelers disagree most (project admins)",
    description="Scores come from `manage.py score_items` (labeling.routing); `agreement` is "
    "the share of the pairs the labelers' consensus orders that the reward model orders alike.",
)
def item_disagreements(request, project_id: int):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    return _disagreements(project)


@router.put(
    "/projects/{project_id}/routing",
    response={200: DisagreementsOut, **ERRORS},
    summary="Turn disagreement routing on or off (project admins)",
)
def project_routing(request, project_id: int, payload: RoutingIn):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    try:
        routing.project_routing_set(project=project, **payload.model_dump())
        routing.item_scores_refresh(project=project)  # the routed target may have changed
    except LabelingError as e:
        return _refused(e)
    return _disagreements(project)


# --------------------------------------------------------------------------- people


class MemberIn(Schema):
    username: str
    role: str = "labeler"


class MemberOut(Schema):
    user_id: int
    username: str
    role: str


class UserCreateIn(Schema):
    username: str
    password: str
    role: str = "labeler"


class InviteIn(Schema):
    role: str = "labeler"
    days: int = services.INVITE_DAYS


class InviteInfoOut(Schema):
    id: int
    role: str
    created_at: datetime
    expires_at: datetime


class InviteOut(InviteInfoOut):
    token: str
    url: str


class InviteAcceptIn(Schema):
    token: str
    username: str
    password: str


class InviteAcceptOut(Schema):
    user_id: int
    username: str
    project_id: int
    role: str


def _member(m) -> dict:
    return {"user_id": m.user_id, "username": m.user.username, "role": m.role}


@router.get(
    "/projects/{project_id}/members",
    response={200: list[MemberOut], 404: ErrorOut, **INVALID},
    summary="The project's members (project admins)",
)
def member_list(request, project_id: int):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    return [_member(m) for m in selectors.project_members(project=project)]


@router.post(
    "/projects/{project_id}/members",
    response={200: MemberOut, **ERRORS},
    summary="Add an existing user by username, or change a member's role (project admins)",
)
def member_add(request, project_id: int, payload: MemberIn):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    try:
        m = services.membership_add_by_username(
            project=project, username=payload.username, role=payload.role
        )
    except LabelingError as e:
        return _refused(e)
    return _member(m)


@router.delete(
    "/projects/{project_id}/members/{user_id}",
    response={204: None, **ERRORS},
    summary="Remove a member (project admins); their rankings stay, their leases end",
)
def member_remove(request, project_id: int, user_id: int):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    try:
        services.membership_remove(project=project, user_id=user_id)
    except LabelingError as e:
        return _refused(e)
    return Status(204, None)


@router.post(
    "/projects/{project_id}/users",
    response={201: MemberOut, **ERRORS},
    summary="Create an account and make it a member (project admins)",
)
def user_create(request, project_id: int, payload: UserCreateIn):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    try:
        m = services.user_create_for_project(
            project=project, username=payload.username, password=payload.password, role=payload.role
        )
    except LabelingError as e:
        return _refused(e)
    return Status(201, _member(m))


@router.post(
    "/projects/{project_id}/invites",
    response={201: InviteOut, **ERRORS},
    summary="Create a one-time invite link for a role (project admins); the token is shown "
    "only in this response",
)
def invite_create(request, project_id: int, payload: InviteIn | None = None):
    payload = payload or InviteIn()
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    try:
        created = services.invite_create(
            project=project, role=payload.role, days=payload.days, created_by=request.auth
        )
    except LabelingError as e:
        return _refused(e)
    invite = created.invite
    return Status(
        201,
        {
            "id": invite.pk,
            "role": invite.role,
            "created_at": invite.created_at,
            "expires_at": invite.expires_at,
            "token": created.token,
            "url": request.build_absolute_uri(reverse("invite_accept", args=[created.token])),
        },
    )


@router.get(
    "/projects/{project_id}/invites",
    response={200: list[InviteInfoOut], 404: ErrorOut, **INVALID},
    summary="The project's open invites (not their tokens)",
)
def invite_list(request, project_id: int):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    return list(selectors.project_open_invites(project=project))


@router.delete(
    "/projects/{project_id}/invites/{invite_id}",
    response={204: None, **ERRORS},
    summary="Revoke an unused invite (project admins)",
)
def invite_revoke(request, project_id: int, invite_id: int):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    try:
        services.invite_revoke(project=project, invite_id=invite_id)
    except LabelingError as e:
        return _refused(e)
    return Status(204, None)


@router.post(
    "/invites/accept",
    auth=None,
    response={201: InviteAcceptOut, **ERRORS},
    summary="Use an invite: create the account it allows (no login needed; once per invite)",
)
def invite_accept(request, payload: InviteAcceptIn):
    try:
        user = services.invite_accept(
            token=payload.token, username=payload.username, password=payload.password
        )
    except LabelingError as e:
        return _refused(e)
    m = user.memberships.get()
    return Status(
        201,
        {"user_id": user.pk, "username": user.username, "project_id": m.project_id, "role": m.role},
    )


# --------------------------------------------------------------------------- import / export


@router.post(
    "/projects/{project_id}/import",
    response={200: ImportOut, 400: ErrorOut, 404: ErrorOut, 413: ErrorOut, **INVALID},
    summary="Import a JSONL or CSV file (project admins); a bad line stores nothing",
    description="A bad record is a 400 naming its line (`line`) and field; a file over the "
    "server's IMPORT_MAX_BYTES is a 413. `wait_for_k`: unranked completions that do not fill "
    "an item of the project's K wait for more instead of being refused.",
)
def project_import(
    request,
    project_id: int,
    file: File[UploadedFile],
    fmt: Form[str | None] = None,
    wait_for_k: Form[bool] = False,
):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    if fmt in ("", "auto"):
        fmt = None
    if fmt is not None and fmt not in FORMATS:
        return Status(
            400, {"detail": f"fmt must be one of {', '.join(FORMATS)} (or empty to detect it)"}
        )
    try:
        report = import_file(
            project=project,
            fileobj=file,
            fmt=fmt,
            user=request.auth,
            wait_for_k=wait_for_k,
            max_bytes=settings.IMPORT_MAX_BYTES,
        )
    except ImportTooLarge as e:
        return Status(
            413,
            {
                "detail": f"{file.name}: {e}. Nothing from this file was stored.",
                "code": "too_large",
            },
        )
    except ImportFileError as e:
        return Status(
            400,
            {
                "detail": f"{file.name}, {e}. Nothing from this file was stored.",
                "code": "bad_line",
                "line": e.line,
            },
        )
    return report.as_dict()


@router.get(
    "/projects/{project_id}/export",
    response={200: None, 400: ErrorOut, 404: ErrorOut, **INVALID},
    summary="Download rankings, pairs or HH pairs as JSONL (project admins); streamed",
    openapi_extra={
        "responses": {
            200: {"description": "JSONL, one object per line", "content": {"application/jsonl": {}}}
        }
    },
)
def project_export(request, project_id: int, kind: str = "rankings", consensus: bool = False):
    project = selectors.project_get_for_user(user=request.auth, project_id=project_id, admin=True)
    if kind not in EXPORT_KINDS:
        return Status(400, {"detail": f"kind must be one of {', '.join(EXPORT_KINDS)}"})
    response = StreamingHttpResponse(
        export_jsonl(project=project, kind=kind, consensus=consensus),
        content_type="application/jsonl; charset=utf-8",
    )
    filename = f"project-{project.pk}-{kind}{'-consensus' if consensus else ''}.jsonl"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --------------------------------------------------------------------------- tokens


@router.post(
    "/tokens",
    response={201: TokenOut, 403: ErrorOut, **INVALID},
    summary="Create an API token for yourself (from a logged-in session, with CSRF); the raw "
    "token is shown only in this response",
)
def token_create(request, payload: TokenIn | None = None):
    if getattr(request.auth, "api_token_id", None) is not None:  # authenticated by a token
        return Status(
            403,
            {
                "detail": "A token cannot create tokens: create them while logged in, on the "
                "API tokens page or with a session.",
                "code": "session_required",
            },
        )
    name = (payload.name if payload else "")[:100]
    raw = api_token_create(user=request.auth, name=name)
    row = ApiToken.objects.get(key_hash=token_hash(raw))
    return Status(201, {"id": row.pk, "name": row.name, "token": raw})


@router.get("/tokens", response=list[TokenInfoOut], summary="Your API tokens (not their values)")
def token_list(request):
    return list(api_tokens_for_user(user=request.auth))


@router.delete(
    "/tokens/{token_id}",
    response={204: None, 404: ErrorOut, **INVALID},
    summary="Revoke one of your API tokens (a script may revoke the token it uses)",
)
def token_revoke(request, token_id: int):
    if not api_token_revoke(user=request.auth, token_id=token_id):
        return Status(404, {"detail": "You have no token with that id.", "code": "not_found"})
    return Status(204, None)
