"""Create the built-in simulated provider so the demo works unconfigured."""

from django.db import migrations


def create_simulated(apps, schema_editor):  # type: ignore[no-untyped-def]
    Provider = apps.get_model("llm", "Provider")
    Provider.objects.get_or_create(
        name="simulated",
        defaults={"kind": "simulated", "order": 100, "enabled": True, "options": {}},
    )


def remove_simulated(apps, schema_editor):  # type: ignore[no-untyped-def]
    apps.get_model("llm", "Provider").objects.filter(name="simulated").delete()


class Migration(migrations.Migration):
    dependencies = [("llm", "0001_initial")]
    operations = [migrations.RunPython(create_simulated, remove_simulated)]
