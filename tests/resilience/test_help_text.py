"""Every policy field an operator sees says what it does."""

import pytest
from django.apps import apps


@pytest.mark.parametrize(
    "model",
    [*apps.get_app_config("resilience").get_models(),
     apps.get_model("llm", "Provider")],
    ids=lambda model: model.__name__,
)  # fmt: skip
def test_every_field_has_help_text(model: type) -> None:
    fields = [f for f in model._meta.get_fields() if f.concrete and not f.primary_key]
    missing = [f.name for f in fields if not str(f.help_text).strip()]
    assert missing == []
