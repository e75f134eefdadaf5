from django.urls import path

import config.ids  # noqa: F401  (registers the <id:...> URL converter)
from training import views

app_name = "training"
urlpatterns = [
    path("", views.job_list, name="home"),
    path("jobs/poll", views.job_list_poll, name="job_list_poll"),
    path("launch/<str:kind>/", views.job_launch, name="job_launch"),
    path("jobs/<id:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<id:job_id>/metrics", views.job_metrics, name="job_metrics"),
    path("jobs/<id:job_id>/cancel", views.job_cancel, name="job_cancel"),
    path("compare/", views.job_compare, name="job_compare"),
    path("checkpoints/", views.checkpoint_list, name="checkpoint_list"),
    path("checkpoints/<id:checkpoint_id>/", views.checkpoint_detail, name="checkpoint_detail"),
]
