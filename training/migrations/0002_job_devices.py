"""A job asks for a number of devices (one process each under torchrun); default 1."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("training", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="devices",
            field=models.PositiveSmallIntegerField(default=1),
        ),
        migrations.AddConstraint(
            model_name="job",
            constraint=models.CheckConstraint(
                condition=models.Q(("devices__gte", 1)), name="job_devices_at_least_1"
            ),
        ),
    ]
