"""manage.py score_items PROJECT_ID --checkpoint ID | --refresh

Scores the project's items with one of its reward-model checkpoints (labeling.routing), so
that disagreement routing and the disagreements page can set the model beside the labelers;
or, with --refresh, recomputes agreement and routing from the rankings as they are now."""

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError

from labeling import routing
from labeling.models import Project
from labeling.services import LabelingError


class Command(BaseCommand):
    help = "Score a project's items with a reward checkpoint, for disagreement routing."

    def add_arguments(self, parser):
        parser.add_argument("project_id", type=int)
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--checkpoint", type=int, help="a reward-model checkpoint id")
        group.add_argument(
            "--refresh", action="store_true", help="recompute agreement and routing only"
        )

    def handle(self, *args, project_id, checkpoint, refresh, **options):
        project = Project.objects.filter(pk=project_id).first()
        if project is None:
            raise CommandError(f"There is no project {project_id}.")
        if refresh:
            counts = routing.item_scores_refresh(project=project)
        else:
            Checkpoint = apps.get_model("training", "Checkpoint")
            ckpt = Checkpoint.objects.filter(
                pk=checkpoint, project=project, role=Checkpoint.Role.REWARD
            ).first()
            if ckpt is None:
                raise CommandError(f"Project {project_id} has no reward checkpoint {checkpoint}.")
            try:
                routing.item_scores_compute(
                    project=project, checkpoint_path=ckpt.path, checkpoint_id=ckpt.pk
                )
            except LabelingError as exc:
                raise CommandError(exc.message) from None
            counts = routing.item_scores_refresh(project=project)
        self.stdout.write(
            f"{counts['scored']} items scored, {counts['disagree']} where the reward model "
            f"disagrees with the labelers, {counts['routed']} routed."
        )
