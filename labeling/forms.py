"""Forms of the labeling pages, including the throttled login form."""

import hashlib

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache

from labeling.models import Membership, Project


def _throttle_key(username: str, ip: str) -> str:
    digest = hashlib.sha256(f"{username.strip().lower()}|{ip}".encode()).hexdigest()[:32]
    return f"login-failures:{digest}"


def client_ip(request) -> str:
    # REMOTE_ADDR only: X-Forwarded-For is client-controlled unless a trusted proxy rewrites it.
    return request.META.get("REMOTE_ADDR", "") if request is not None else ""


class LoginThrottleMixin:
    """Refuses to check a password after LOGIN_THROTTLE_ATTEMPTS failures for the same
    username (case-insensitive) from the same IP within LOGIN_THROTTLE_WINDOW_S seconds
    (counted in the cache). Shared by every login form, so that one page's count holds on
    the others."""

    throttled_message = (
        "Too many failed login attempts for this account from your address. "
        "Wait %(minutes)s minute(s) and try again."
    )

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        key = _throttle_key(username, client_ip(self.request))
        window = settings.LOGIN_THROTTLE_WINDOW_S
        if (cache.get(key) or 0) >= settings.LOGIN_THROTTLE_ATTEMPTS:
            raise forms.ValidationError(
                self.error_messages["throttled"],
                code="throttled",
                params={"minutes": max(1, round(window / 60))},
            )
        try:
            cleaned = super().clean()
        except forms.ValidationError:
            if cache.add(key, 1, timeout=window) is False:
                try:
                    cache.incr(key)
                except ValueError:  # expired between add and incr
                    cache.add(key, 1, timeout=window)
            raise
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
    class Meta:
        model = Project
        fields = [
            "name",
            "instructions",
            "k",
            "annotations_per_item",
            "allow_ties",
            "lease_seconds",
        ]
        labels = {
            "k": "Responses per item (K)",
            "annotations_per_item": "Labelers per item",
            "lease_seconds": "Lease (seconds a labeler keeps an item)",
        }
        widgets = {"instructions": forms.Textarea(attrs={"rows": 8})}


class MemberForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.LABELER)


class ImportForm(forms.Form):
    file = forms.FileField(
        help_text="JSONL or CSV: prompts, prompts with completions, pairs or HH."
    )
    fmt = forms.ChoiceField(
        label="Format",
        choices=[("", "Detect from the file"), ("jsonl", "JSONL"), ("csv", "CSV")],
        required=False,
    )
