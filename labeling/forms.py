"""Forms of the labeling pages, including the throttled login form."""

import hashlib

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache

from labeling.models import Membership, Project
from labeling.services import (
    INVITE_DAYS,
    MAX_INVITE_DAYS,
    MAX_LEASE_SECONDS,
    MIN_LEASE_SECONDS,
    PROJECT_SETTINGS,
)


def _throttle_key(username: str, ip: str) -> str:
    digest = hashlib.sha256(f"{username.strip().lower()}|{ip}".encode()).hexdigest()[:32]
    return f"login-failures:{digest}"


def client_ip(request) -> str:
    # REMOTE_ADDR only: X-Forwarded-For is client-controlled unless a trusted proxy rewrites it.
    return request.META.get("REMOTE_ADDR", "") if request is not None else ""


def reserve_login_attempt(key: str, *, window_s: int) -> int:
    """Count one more login attempt under ``key`` and return the count, in one atomic step of
    the cache (Redis ``SET NX EX`` then ``INCR``; the local-memory cache under its lock), so
    concurrent attempts each get their own number. The count lives ``window_s`` seconds from
    the first attempt. A cache whose ``add``/``incr`` are not atomic (the database or file
    cache) would let concurrent attempts share a number: configure Redis or local memory."""
    while True:
        if cache.add(key, 1, timeout=window_s):
            return 1
        try:
            count = cache.incr(key)
        except ValueError:  # the window ended between add and incr: start a new one
            continue
        if count == 1:
            # The key expired between Django's EXISTS and Redis's INCR, which re-created it
            # without an expiry: give it one, or this account would stay locked out for good.
            cache.touch(key, timeout=window_s)
        return count


class LoginThrottleMixin:
    """Refuses to check a password after LOGIN_THROTTLE_ATTEMPTS attempts without a success
    for the same username (case-insensitive) from the same IP within LOGIN_THROTTLE_WINDOW_S
    seconds (counted in the cache). An attempt is counted BEFORE its password is hashed, so
    concurrent attempts cannot all pass the check while the slow hash runs: at most
    LOGIN_THROTTLE_ATTEMPTS passwords are ever checked per window. A success clears the
    count. Shared by every login form, so that one page's count holds on the others."""

    throttled_message = (
        "Too many failed login attempts for this account from your address. "
        "Wait %(minutes)s minute(s) and try again."
    )

    def clean(self):
        username = self.cleaned_data.get("username")
        if username is None or not self.cleaned_data.get("password"):
            return super().clean()  # no password is checked: nothing to count
        key = _throttle_key(username, client_ip(self.request))
        window = settings.LOGIN_THROTTLE_WINDOW_S
        if reserve_login_attempt(key, window_s=window) > settings.LOGIN_THROTTLE_ATTEMPTS:
            raise forms.ValidationError(
                self.error_messages["throttled"],
                code="throttled",
                params={"minutes": max(1, round(window / 60))},
            )
        cleaned = super().clean()  # a wrong password raises: its attempt stays counted
        cache.delete(key)
        return cleaned


class ThrottledAuthenticationForm(LoginThrottleMixin, AuthenticationForm):
    """The site's login form, throttled."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": LoginThrottleMixin.throttled_message,
    }


class ThrottledAdminAuthenticationForm(LoginThrottleMixin, AdminAuthenticationForm):
    """The Django admin's login form (/django-admin/login/), throttled like the site's: an
    unthrottled second login page would let anyone guess staff passwords without limit."""

    error_messages = {
        **AdminAuthenticationForm.error_messages,
        "throttled": LoginThrottleMixin.throttled_message,
    }


class ProjectForm(forms.ModelForm):
    # The lease's bounds are the service's rule (project_create and project_update check it
    # and say why); the field only tells the browser those bounds. It is not a model field
    # of this form, so the model's own bounds (a PositiveIntegerField: 0 to 2**31 - 1) are
    # not checked first with another message.
    lease_seconds = forms.IntegerField(
        label="Lease (seconds a labeler keeps an item)",
        help_text=f"From {MIN_LEASE_SECONDS} seconds to 30 days ({MAX_LEASE_SECONDS} seconds).",
        initial=Project._meta.get_field("lease_seconds").default,
        widget=forms.NumberInput(attrs={"min": MIN_LEASE_SECONDS, "max": MAX_LEASE_SECONDS}),
    )

    class Meta:
        model = Project
        fields = [name for name in PROJECT_SETTINGS if name != "lease_seconds"]
        labels = {
            "k": "Responses per item (K)",
            "annotations_per_item": "Labelers per item",
        }
        widgets = {"instructions": forms.Textarea(attrs={"rows": 8})}


class ProjectSettingsForm(ProjectForm):
    """The project form for an existing project: starts from its settings; K is read-only
    once the project has items."""

    def __init__(self, *args, project: Project, k_locked: bool, **kwargs):
        initial = {name: getattr(project, name) for name in PROJECT_SETTINGS}
        super().__init__(*args, initial=initial, **kwargs)
        if k_locked:
            self.fields["k"].disabled = True
            self.fields["k"].help_text = (
                "Fixed: the project has items of this many responses. Make a new project for "
                "another K."
            )


def add_service_error(form: forms.Form, error) -> None:
    """Show a LabelingError on the field it names (or above the form)."""
    field = getattr(error, "field", None)
    form.add_error(field if field in form.fields else None, error.message)


class MemberForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.LABELER)


class InviteForm(forms.Form):
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.LABELER)
    days = forms.IntegerField(
        label="Valid for (days)", min_value=1, max_value=MAX_INVITE_DAYS, initial=INVITE_DAYS
    )


class UserCreateForm(forms.Form):
    username = forms.CharField(max_length=150)
    password = forms.CharField(strip=False, widget=forms.PasswordInput(render_value=False))
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.LABELER)


class InviteAcceptForm(forms.Form):
    username = forms.CharField(max_length=150)
    password1 = forms.CharField(label="Password", strip=False, widget=forms.PasswordInput)
    password2 = forms.CharField(label="Password again", strip=False, widget=forms.PasswordInput)

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("password1") and cleaned.get("password1") != cleaned.get("password2"):
            self.add_error("password2", "The two passwords differ.")
        return cleaned


def form_errors_text(form: forms.Form) -> str:
    """A form's errors as one line naming each field, for a message after a redirect."""
    parts = []
    for name, errors in form.errors.items():
        label = form.fields[name].label or name.replace("_", " ").capitalize()
        parts.append(f"{label if name != '__all__' else ''}: {' '.join(errors)}".lstrip(": "))
    return " ".join(parts)


class ImportForm(forms.Form):
    file = forms.FileField(
        help_text="JSONL or CSV: prompts, prompts with completions, pairs or HH."
    )
    fmt = forms.ChoiceField(
        label="Format",
        choices=[("", "Detect from the file"), ("jsonl", "JSONL"), ("csv", "CSV")],
        required=False,
    )
    wait_for_k = forms.BooleanField(
        label="Keep completions that do not fill an item of K (they wait for more)",
        required=False,
    )
