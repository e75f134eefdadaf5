"""manage.py import_data PROJECT_ID FILE [--format jsonl|csv] [--user USERNAME] [--wait-for-k]

Imports prompts, completions and preferences (see labeling.importexport). A bad line is
reported as FILE:LINE: what is wrong, and nothing from the file is stored."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from labeling.importexport import FORMATS, ImportFileError, import_file
from labeling.models import Project


class Command(BaseCommand):
    help = "Import a JSONL or CSV file of prompts, completions or preferences into a project."

    def add_arguments(self, parser):
        parser.add_argument("project_id", type=int)
        parser.add_argument("path", help="a .jsonl or .csv file")
        parser.add_argument(
            "--format", choices=FORMATS, default=None, help="default: detected from the content"
        )
        parser.add_argument(
            "--user", default=None, help="username recorded as the importer (optional)"
        )
        parser.add_argument(
            "--wait-for-k",
            action="store_true",
            help="keep unranked completions that do not fill an item of the project's K "
            "(they wait for more) instead of refusing their line",
        )

    def handle(self, *args, project_id, path, format, user, wait_for_k, **options):
        project = Project.objects.filter(pk=project_id).first()
        if project is None:
            raise CommandError(f"There is no project {project_id}.")
        importer = None
        if user:
            importer = get_user_model().objects.filter(username=user).first()
            if importer is None:
                raise CommandError(f"There is no user named {user!r}.")
        try:
            with open(path, "rb") as fileobj:
                report = import_file(
                    project=project,
                    fileobj=fileobj,
                    fmt=format,
                    user=importer,
                    wait_for_k=wait_for_k,
                )
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc.strerror}") from None
        except ImportFileError as exc:
            raise CommandError(f"{path}:{exc.line}: {exc.message} (nothing was imported)") from None
        self.stdout.write(
            f"Imported {report.records} {report.fmt} records into project {project.pk}: "
            f"{report.prompts} prompts, {report.completions} completions, {report.items} items, "
            f"{report.rankings} rankings."
        )
