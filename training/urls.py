from django.urls import path

from training import views

app_name = "training"
urlpatterns = [
    path("", views.job_list, name="home"),
    path("launch/<str:kind>/", views.job_launch, name="job_launch"),
    path("jobs/<int:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<int:job_id>/metrics", views.job_metrics, name="job_metrics"),
    path("jobs/<int:job_id>/cancel", views.job_cancel, name="job_cancel"),
    path("compare/", views.job_compare, name="job_compare"),
    path("checkpoints/", views.checkpoint_list, name="checkpoint_list"),
    path("checkpoints/<int:checkpoint_id>/", views.checkpoint_detail, name="checkpoint_detail"),
]
