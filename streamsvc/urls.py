from django.contrib import admin
from django.urls import path

from . import metrics_view, status_views, views

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", metrics_view.metrics, name="metrics"),
    path("status/", status_views.status_page, name="status"),
    path("status/events", status_views.status_events, name="status-events"),
    path("admin/login/", views.guarded_login, name="admin-login"),
    path("admin/", admin.site.urls),
]
