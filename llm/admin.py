from django.contrib import admin

from .models import Provider


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "order", "enabled")
    list_editable = ("order", "enabled")
    list_filter = ("kind", "enabled")
    search_fields = ("name",)
