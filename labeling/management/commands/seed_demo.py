"""`manage.py seed_demo`: the demo project, an admin and a labeler (random passwords, printed once)."""

from django.core.management.base import BaseCommand

from labeling.services import demo_seed


class Command(BaseCommand):
    help = (
        "Create the demo project with ~20 prompts and an admin and a labeler account (idempotent)."
    )

    def handle(self, *args, **options):
        result = demo_seed()
        for line in result.lines():
            self.stdout.write(line)
