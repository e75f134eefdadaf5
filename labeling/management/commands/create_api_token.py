"""manage.py create_api_token USERNAME [--name NAME]: prints a new API token once.

Scripts send it as `Authorization: Bearer <token>`; only its SHA-256 is stored."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from labeling.auth import api_token_create


class Command(BaseCommand):
    help = "Create an API token for a user and print it (it is shown only this once)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label to tell tokens apart")

    def handle(self, *args, username, name, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"There is no user named {username!r}.")
        if not user.is_active:
            raise CommandError(f"User {username!r} is inactive.")
        self.stdout.write(api_token_create(user=user, name=name[:100]))
