"""manage.py export_data PROJECT_ID [--kind rankings|pairs|hh] [--consensus] [--output FILE]

Writes JSONL (see labeling.importexport): to FILE, or to standard output with "-"."""

import sys

from django.core.management.base import BaseCommand, CommandError

from labeling.importexport import EXPORT_KINDS, export_to_file
from labeling.models import Project


class Command(BaseCommand):
    help = "Export a project's rankings or pairwise preferences as JSONL."

    def add_arguments(self, parser):
        parser.add_argument("project_id", type=int)
        parser.add_argument("--kind", choices=EXPORT_KINDS, default="rankings")
        parser.add_argument(
            "--consensus", action="store_true", help="one Borda-count consensus ranking per item"
        )
        parser.add_argument(
            "--output", "-o", default="-", help='a file, or "-" for standard output'
        )

    def handle(self, *args, project_id, kind, consensus, output, **options):
        project = Project.objects.filter(pk=project_id).first()
        if project is None:
            raise CommandError(f"There is no project {project_id}.")
        if output == "-":
            rows = export_to_file(
                project=project, fileobj=sys.stdout.buffer, kind=kind, consensus=consensus
            )
        else:
            try:
                with open(output, "wb") as fileobj:
                    rows = export_to_file(
                        project=project, fileobj=fileobj, kind=kind, consensus=consensus
                    )
            except OSError as exc:
                raise CommandError(f"Cannot write {output}: {exc.strerror}") from None
            self.stderr.write(f"Wrote {rows} {kind} rows to {output}.")
