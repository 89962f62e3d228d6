from django.apps import AppConfig


class ResilienceConfig(AppConfig):
    name = "resilience"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (connects the receivers)
