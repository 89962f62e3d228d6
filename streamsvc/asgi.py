"""ASGI entry point: the streaming consumer, and Django for everything else."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "streamsvc.settings")
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from .consumers import ChatStreamConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": URLRouter(
            [
                path("api/v1/chat/stream", ChatStreamConsumer.as_asgi()),
                re_path(r"", django_application),  # type: ignore[arg-type]
            ]
        ),
    }
)
