from django.apps import AppConfig


class StreamsvcConfig(AppConfig):
    name = "streamsvc"
    verbose_name = "streamsvc"

    def ready(self) -> None:
        # Connects the receivers that drop cached identities on logout and
        # on user changes, in every process (manage.py commands included).
        from . import identity  # noqa: F401
