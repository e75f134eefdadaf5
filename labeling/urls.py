"""Pages of the labeling studio. `login`/`logout` are global names (settings.LOGIN_URL);
everything else lives in the "labeling" namespace."""

from django.contrib.auth import views as auth_views
from django.urls import include, path

import config.ids  # noqa: F401  (registers the <id:...> URL converter)
from labeling import views

page_patterns = [
    path("", views.home, name="home"),
    path("account/tokens/", views.api_tokens, name="api_tokens"),
    path("projects/new/", views.project_create_view, name="project_create"),
    path("projects/<id:project_id>/", views.project_dashboard, name="project_dashboard"),
    path(
        "projects/<id:project_id>/disagreements/",
        views.project_disagreements,
        name="project_disagreements",
    ),
    path("projects/<id:project_id>/routing/", views.project_routing_set, name="project_routing"),
    path("projects/<id:project_id>/settings/", views.project_settings, name="project_settings"),
    path("projects/<id:project_id>/members/", views.member_add, name="member_add"),
    path("projects/<id:project_id>/people/", views.project_people, name="project_people"),
    path(
        "projects/<id:project_id>/members/<id:user_id>/remove/",
        views.member_remove,
        name="member_remove",
    ),
    path("projects/<id:project_id>/users/", views.user_create_view, name="user_create"),
    path("projects/<id:project_id>/invites/", views.invite_create_view, name="invite_create"),
    path(
        "projects/<id:project_id>/invites/<id:invite_id>/revoke/",
        views.invite_revoke_view,
        name="invite_revoke",
    ),
    path("projects/<id:project_id>/import/", views.project_import, name="project_import"),
    path("projects/<id:project_id>/export/", views.project_export, name="project_export"),
    path(
        "projects/<id:project_id>/flags/<id:flag_id>/resolve/",
        views.flag_resolve_view,
        name="flag_resolve",
    ),
    path("projects/<id:project_id>/label/", views.label, name="label"),
    path("projects/<id:project_id>/label/next/", views.label_next, name="label_next"),
    path("projects/<id:project_id>/my-rankings/", views.my_rankings, name="my_rankings"),
    path(
        "projects/<id:project_id>/items/<id:item_id>/revise/",
        views.ranking_revise_view,
        name="ranking_revise",
    ),
    path(
        "projects/<id:project_id>/items/<id:item_id>/submit/",
        views.item_submit,
        name="item_submit",
    ),
    path(
        "projects/<id:project_id>/items/<id:item_id>/skip/",
        views.item_skip_view,
        name="item_skip",
    ),
    path(
        "projects/<id:project_id>/items/<id:item_id>/flag/",
        views.item_flag_view,
        name="item_flag",
    ),
]

urlpatterns = [
    path("accounts/login/", views.ThrottledLoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("invite/<str:token>/", views.invite_accept_view, name="invite_accept"),
    path("", include((page_patterns, "labeling"))),
]
