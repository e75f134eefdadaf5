"""Labeling pages. Each view: a permission-scoped lookup (`project_get_for_user`, which
raises 404 outside the user's projects), one service or selector call, a response.

The ranking page's JSON endpoints (next, submit, skip, flag) are POSTs with the CSRF token
in the X-CSRFToken header; errors come back as {"error": message, "code": ...} with the
status of the LabelingError.
"""

from __future__ import annotations

import json
from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login as auth_login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from config.ids import as_id
from labeling import routing, selectors, services
from labeling.auth import api_token_create, api_token_revoke, api_tokens_for_user
from labeling.forms import (
    ImportForm,
    InviteAcceptForm,
    InviteForm,
    MemberForm,
    ProjectForm,
    ProjectSettingsForm,
    ThrottledAuthenticationForm,
    UserCreateForm,
    add_service_error,
    form_errors_text,
)
from labeling.models import Flag
from labeling.services import LabelingError


class ThrottledLoginView(auth_views.LoginView):
    authentication_form = ThrottledAuthenticationForm
    redirect_authenticated_user = True


def _can_create_projects(user) -> bool:
    return user.is_staff or user.has_perm("labeling.add_project")


@login_required
@require_GET
def home(request):
    projects = selectors.project_list_for_user(user=request.user)
    return render(
        request,
        "labeling/home.html",
        {"projects": projects, "can_create": _can_create_projects(request.user)},
    )


@login_required
@require_http_methods(["GET", "POST"])
def project_create_view(request):
    if not _can_create_projects(request.user):
        raise PermissionDenied("Only staff can create projects.")
    form = ProjectForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            project = services.project_create(created_by=request.user, **form.cleaned_data)
        except LabelingError as e:
            add_service_error(form, e)
        else:
            messages.success(request, f"Created {project.name}. Add labelers below.")
            return redirect("labeling:project_dashboard", project_id=project.pk)
    return render(request, "labeling/project_form.html", {"form": form})


@login_required
@require_http_methods(["GET", "POST"])
def project_settings(request, project_id):
    """Project admins change the settings (K only while the project has no items)."""
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    form = ProjectSettingsForm(
        request.POST or None, project=project, k_locked=project.items.exists()
    )
    if request.method == "POST" and form.is_valid():
        try:
            services.project_update(project=project, **form.cleaned_data)
        except LabelingError as e:
            add_service_error(form, e)
        else:
            messages.success(request, f"Saved the settings of {project.name}.")
            return redirect("labeling:project_dashboard", project_id=project.pk)
    return render(request, "labeling/project_form.html", {"form": form, "project": project})


@login_required
@require_GET
def project_dashboard(request, project_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id)
    if not project.is_admin:
        return redirect("labeling:label", project_id=project.pk)
    context = {
        "project": project,
        "progress": selectors.project_progress(project=project),
        "members": selectors.project_members(project=project),
        "flags": selectors.flagged_items(project=project)[:100],
        "flag_counts": selectors.flag_counts_by_category(project=project),
        "stats": selectors.labeler_stats(project=project),
        "agreement": selectors.project_agreement(project=project),
        "labeler_report": selectors.labeler_report(project=project),
        "member_form": MemberForm(),
        "import_form": ImportForm(),
    }
    return render(request, "labeling/dashboard.html", context)


@login_required
@require_GET
def project_disagreements(request, project_id):
    """The items where the reward model and the labelers disagree most, to adjudicate, and
    the disagreement-routing switch (project admins)."""
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    context = {"project": project, **selectors.item_disagreements(project=project)}
    return render(request, "labeling/disagreements.html", context)


@login_required
@require_POST
def project_routing_set(request, project_id):
    """Routing on/off and labelers per routed item; `refresh` recomputes against the rankings."""
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    try:
        if "refresh" not in request.POST:
            raw = request.POST.get("routed_annotations_per_item", "").strip()
            routing.project_routing_set(
                project=project,
                route_disagreements=request.POST.get("route_disagreements") == "on",
                routed_annotations_per_item=int(raw) if raw.isascii() and raw.isdigit() else raw,
            )
        counts = routing.item_scores_refresh(project=project)
    except LabelingError as e:
        messages.error(request, e.message)
    else:
        messages.success(
            request,
            f"Routing is {'on' if project.route_disagreements else 'off'}: {counts['routed']} of "
            f"{counts['scored']} scored items routed, {counts['disagree']} disagreements.",
        )
    return redirect("labeling:project_disagreements", project_id=project.pk)


@login_required
@require_POST
def member_add(request, project_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    form = MemberForm(request.POST)
    if form.is_valid():
        try:
            m = services.membership_add_by_username(project=project, **form.cleaned_data)
        except LabelingError as e:
            messages.error(request, e.message)
        else:
            messages.success(request, f"{m.user.username} is now a {m.role} of {project.name}.")
    else:
        messages.error(request, "Give a username and a role.")
    return redirect("labeling:project_dashboard", project_id=project.pk)


NEW_INVITE_KEY = "new_invite_link"


@never_cache  # the page that shows a new invite link must not be kept by any cache
@login_required
@require_GET
def project_people(request, project_id):
    """Members (remove them), new accounts and one-time invite links, for project admins."""
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    return _people_page(request, project, user_form=UserCreateForm())


def _people_page(request, project, *, user_form, status=200):
    context = {
        "project": project,
        "members": selectors.project_members(project=project),
        "invites": selectors.project_open_invites(project=project),
        "new_invite": request.session.pop(NEW_INVITE_KEY, None),
        "invite_form": InviteForm(),
        "user_form": user_form,
        "member_form": MemberForm(),
    }
    return render(request, "labeling/people.html", context, status=status)


@login_required
@require_POST
def member_remove(request, project_id, user_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    try:
        services.membership_remove(project=project, user_id=user_id)
    except LabelingError as e:
        messages.error(request, e.message)
    else:
        if user_id == request.user.pk:
            messages.success(request, f"You left {project.name}.")
            return redirect("labeling:home")
        messages.success(request, f"User {user_id} is no longer a member of {project.name}.")
    return redirect("labeling:project_people", project_id=project.pk)


@login_required
@require_POST
def user_create_view(request, project_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    form = UserCreateForm(request.POST)
    if form.is_valid():
        try:
            m = services.user_create_for_project(project=project, **form.cleaned_data)
        except LabelingError as e:
            add_service_error(form, e)
        else:
            messages.success(request, f"Created {m.user.username}, a {m.role} of {project.name}.")
            return redirect("labeling:project_people", project_id=project.pk)
    # the page again, with the errors on the form's fields and the typed username kept
    # (the password field never renders its value)
    return _people_page(request, project, user_form=form)


@login_required
@require_POST
def invite_create_view(request, project_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    form = InviteForm(request.POST)
    if not form.is_valid():
        messages.error(request, form_errors_text(form))
    else:
        created = services.invite_create(
            project=project, created_by=request.user, **form.cleaned_data
        )
        request.session[NEW_INVITE_KEY] = {
            "url": request.build_absolute_uri(reverse("invite_accept", args=[created.token])),
            "role": created.invite.role,
            "expires_at": created.invite.expires_at.isoformat(),
        }
    return redirect("labeling:project_people", project_id=project.pk)


@login_required
@require_POST
def invite_revoke_view(request, project_id, invite_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    try:
        services.invite_revoke(project=project, invite_id=invite_id)
    except LabelingError as e:
        messages.error(request, e.message)
    else:
        messages.success(request, "Invite revoked: its link no longer works.")
    return redirect("labeling:project_people", project_id=project.pk)


@never_cache
@require_http_methods(["GET", "POST"])
def invite_accept_view(request, token):
    """A new person chooses a username and password once; the invite is then used up."""
    try:
        invite = services.invite_for_token(token=token)
    except LabelingError as e:
        return render(request, "registration/invite_accept.html", {"error": e.message}, status=404)
    form = InviteAcceptForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = services.invite_accept(
                token=token,
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password1"],
            )
        except services.InviteNotFound as e:
            return render(
                request, "registration/invite_accept.html", {"error": e.message}, status=404
            )
        except LabelingError as e:
            if e.field == "password":
                e.field = "password1"
            add_service_error(form, e)
        else:
            auth_login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(
                request, f"Welcome, {user.username}: you joined {invite.project.name}."
            )
            return redirect("labeling:label", project_id=invite.project_id)
    return render(request, "registration/invite_accept.html", {"form": form, "invite": invite})


@login_required
@require_POST
def flag_resolve_view(request, project_id, flag_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    try:
        services.flag_resolve(project=project, flag_id=flag_id)
    except LabelingError as e:
        raise Http404(e.message) from None
    return redirect("labeling:project_dashboard", project_id=project.pk)


@login_required
@require_POST
def project_import(request, project_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    form = ImportForm(request.POST, request.FILES)
    if not form.is_valid():
        messages.error(request, "Choose a JSONL or CSV file to import.")
        return redirect("labeling:project_dashboard", project_id=project.pk)
    from labeling.importexport import ImportFileError, ImportTooLarge, import_file

    upload = form.cleaned_data["file"]
    try:
        report = import_file(
            project=project,
            fileobj=upload,
            fmt=form.cleaned_data["fmt"] or None,
            user=request.user,
            wait_for_k=form.cleaned_data["wait_for_k"],
            max_bytes=settings.IMPORT_MAX_BYTES,
        )
    except ImportFileError as e:
        messages.error(request, f"{upload.name}, {e}. Nothing from this file was stored.")
    except ImportTooLarge as e:
        messages.error(request, f"{upload.name}: {e}. Nothing from this file was stored.")
    except ValueError as e:
        messages.error(request, f"{upload.name}: {e}. Nothing from this file was stored.")
    else:
        r = report.as_dict()
        messages.success(
            request,
            f"Imported {upload.name}: {r['records']} records, {r['prompts']} prompts, "
            f"{r['completions']} completions, {r['items']} items, {r['rankings']} rankings.",
        )
    return redirect("labeling:project_dashboard", project_id=project.pk)


@login_required
@require_GET
def project_export(request, project_id):
    project = selectors.project_get_for_user(user=request.user, project_id=project_id, admin=True)
    from labeling.importexport import EXPORT_KINDS, export_jsonl

    kind = request.GET.get("kind", "rankings")
    if kind not in EXPORT_KINDS:
        return HttpResponse(f"kind must be one of {', '.join(EXPORT_KINDS)}", status=400)
    consensus = request.GET.get("consensus") in {"1", "true", "on"}
    filename = f"project-{project.pk}-{kind}{'-consensus' if consensus else ''}.jsonl"
    response = StreamingHttpResponse(
        export_jsonl(project=project, kind=kind, consensus=consensus),
        content_type="application/jsonl; charset=utf-8",
    )
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --------------------------------------------------------------------------- the ranking page


def _item_context(request, project, assignment) -> dict:
    context = {"project": project, "assignment": None}
    if assignment is not None:
        context.update(selectors.assignment_view(assignment=assignment))
    return context


def _item_html(request, project, assignment) -> str:
    return render_to_string(
        "labeling/_item.html", _item_context(request, project, assignment), request=request
    )


@login_required
@require_GET
def label(request, project_id):
    """The ranking page with the user's current item (a lease they hold, or a new one)."""
    project = selectors.project_get_for_user(user=request.user, project_id=project_id)
    assignment = services.assignment_next(project=project, user=request.user)
    context = _item_context(request, project, assignment)
    context["done"] = selectors.labeler_done_count(project=project, user=request.user)
    context["flag_categories"] = Flag.Category.choices
    return render(request, "labeling/label.html", context)


def _error(e: LabelingError) -> JsonResponse:
    return JsonResponse({"error": e.message, "code": e.code}, status=e.status_code)


def _json_body(request) -> dict:
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise LabelingError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise LabelingError("The request body must be a JSON object.")
    return body


@login_required
@require_POST
def label_next(request, project_id):
    """The item after `after` (the one on screen), rendered, for the page to preload."""
    project = selectors.project_get_for_user(user=request.user, project_id=project_id)
    try:
        raw = _json_body(request).get("after")
    except LabelingError:
        raw = "not json"
    after = as_id(raw) if raw is not None else None
    if raw is not None and after is None:
        return JsonResponse({"error": "`after` must be an item id.", "code": "invalid"}, status=400)
    assignment = services.assignment_next(project=project, user=request.user, exclude_item_id=after)
    return JsonResponse(
        {
            "item_id": assignment.item_id if assignment else None,
            "html": _item_html(request, project, assignment),
        }
    )


def _item_in_project(request, project_id, item_id):
    """The project (404 unless a member); the item id must belong to it."""
    project = selectors.project_get_for_user(user=request.user, project_id=project_id)
    if not project.items.filter(pk=item_id).exists():
        raise services.ItemNotFound(f"Item {item_id} does not exist or is not in this project.")
    return project


@login_required
@require_POST
def item_submit(request, project_id, item_id):
    try:
        project = _item_in_project(request, project_id, item_id)
        body = _json_body(request)
        ranking = services.ranking_submit(
            user=request.user,
            item_id=item_id,
            groups=body.get("groups"),
            rationale=body.get("rationale") or "",
            seconds_spent=body.get("seconds_spent"),
            display_order=body.get("display_order"),
        )
    except LabelingError as e:
        return _error(e)
    done = selectors.labeler_done_count(project=project, user=request.user)
    return JsonResponse({"ranking_id": ranking.pk, "groups": ranking.groups, "done": done})


@login_required
@require_POST
def item_skip_view(request, project_id, item_id):
    try:
        _item_in_project(request, project_id, item_id)
        services.item_skip(user=request.user, item_id=item_id)
    except LabelingError as e:
        return _error(e)
    return JsonResponse({"skipped": item_id})


@login_required
@require_POST
def item_flag_view(request, project_id, item_id):
    try:
        _item_in_project(request, project_id, item_id)
        body = _json_body(request)
        flag = services.item_flag(
            user=request.user,
            item_id=item_id,
            reason=body.get("reason"),
            category=body.get("category") or "other",
        )
    except LabelingError as e:
        return _error(e)
    return JsonResponse({"flag_id": flag.pk})


@login_required
@require_GET
def my_rankings(request, project_id):
    """The user's recent rankings in the project, each with a link to revise it."""
    project = selectors.project_get_for_user(user=request.user, project_id=project_id)
    context = {
        "project": project,
        "rankings": selectors.rankings_recent_for_user(project=project, user=request.user),
        "revise_days": services.RANKING_REVISE_DAYS,
        "revise_since": timezone.now() - timedelta(days=services.RANKING_REVISE_DAYS),
    }
    return render(request, "labeling/my_rankings.html", context)


NO_CHANGE_MESSAGE = "No change: your ranking is as it was, so nothing new was stored."


@login_required
@require_http_methods(["GET", "POST"])
def ranking_revise_view(request, project_id, item_id):
    """GET: the ranking page for one of the user's ranked items, set to their ranking.
    POST (JSON, like submit): replace it; the new ranking is the one that counts."""
    if request.method == "POST":
        try:
            _item_in_project(request, project_id, item_id)
            body = _json_body(request)
            ranking = services.ranking_revise(
                user=request.user,
                item_id=item_id,
                groups=body.get("groups"),
                rationale=body.get("rationale"),
                seconds_spent=body.get("seconds_spent"),
            )
        except LabelingError as e:
            return _error(e)
        if not ranking.changed:  # shown on the page the script goes to next
            messages.info(request, NO_CHANGE_MESSAGE)
        return JsonResponse(
            {
                "ranking_id": ranking.pk,
                "groups": ranking.groups,
                "revised_at": ranking.revised_at,
                "changed": ranking.changed,
            }
        )
    project = selectors.project_get_for_user(user=request.user, project_id=project_id)
    ranking = selectors.ranking_for_revision(project=project, user=request.user, item_id=item_id)
    context = _item_context(request, project, ranking)  # shown in the order the user saw
    context.update(revise=ranking, initial_groups=json.dumps(ranking.groups))
    return render(request, "labeling/label.html", context)


NEW_TOKEN_KEY = "new_api_token"


@never_cache  # the page that shows a new token's value must not be kept by any cache
@login_required
@require_http_methods(["GET", "POST"])
def api_tokens(request):
    """The user's API tokens: create one (its value is shown on this response only, never
    stored) or revoke one. Scripts send a token as `Authorization: Bearer <token>`."""
    if request.method == "POST":
        if request.POST.get("action") == "revoke":
            if api_token_revoke(user=request.user, token_id=request.POST.get("token_id")):
                messages.success(request, "Token revoked: scripts using it now get 401.")
            else:
                messages.error(request, "You have no such token.")
        else:  # shown by the redirected GET, once (the session lives in the database)
            request.session[NEW_TOKEN_KEY] = api_token_create(
                user=request.user, name=request.POST.get("name", "").strip()
            )
        return redirect("labeling:api_tokens")  # a reload does not create another token
    created = request.session.pop(NEW_TOKEN_KEY, None)
    return render(
        request,
        "labeling/api_tokens.html",
        {"tokens": api_tokens_for_user(user=request.user), "created": created},
    )
