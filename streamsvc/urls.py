from django.contrib import admin
from django.urls import include, path

from . import metrics_view, views

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", metrics_view.metrics, name="metrics"),
    path("admin/rq/", include("django_rq.urls")),
    path("admin/login/", views.guarded_login, name="admin-login"),
    path("admin/", admin.site.urls),
]
