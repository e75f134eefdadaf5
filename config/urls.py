from django.contrib import admin
from django.urls import include, path

from config.api import api

urlpatterns = [
    path("django-admin/", admin.site.urls),
    path("api/", api.urls),
    path("training/", include("training.urls")),
    path("", include("labeling.urls")),
]
