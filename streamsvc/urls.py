from django.contrib import admin
from django.urls import path

from . import views

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("admin/login/", views.guarded_login, name="admin-login"),
    path("admin/", admin.site.urls),
]
