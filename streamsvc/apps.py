from django.apps import AppConfig


class StreamsvcConfig(AppConfig):
    name = "streamsvc"
    verbose_name = "streamsvc"
