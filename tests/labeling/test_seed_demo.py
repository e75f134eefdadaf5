"""`manage.py seed_demo`: the demo project, accounts with random passwords, idempotent."""

import re
from io import StringIO

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.core.management import call_command

from labeling import selectors, services
from labeling.models import Item, Project, Ranking

pytestmark = pytest.mark.django_db


def test_seed_demo_creates_the_project_and_prints_working_random_passwords():
    out = StringIO()
    call_command("seed_demo", stdout=out)
    text = out.getvalue()
    passwords = dict(re.findall(r"login '(\w+)' password '([^']+)'", text))
    assert set(passwords) == {"admin", "labeler"}
    assert passwords["admin"] != passwords["labeler"] and len(passwords["admin"]) >= 12
    for username, password in passwords.items():
        assert authenticate(username=username, password=password) is not None
    project = Project.objects.get()
    assert project.prompts.count() >= 18
    queue = Item.objects.filter(project=project, source=Item.Source.QUEUE)
    assert queue.count() == project.prompts.count()
    assert all(item.item_completions.count() == 4 for item in Item.objects.all())
    labeler = get_user_model().objects.get(username="labeler")
    assert [p.pk for p in selectors.project_list_for_user(user=labeler)] == [project.pk]
    assert selectors.project_get_for_user(
        user=get_user_model().objects.get(username="admin"), project_id=project.pk, admin=True
    )
    texts = " ".join(c.text for p in project.prompts.all() for c in p.completions.all())
    assert "```" in texts and "\n- " in texts  # code blocks and lists for the markdown renderer


def test_seed_demo_ships_a_reference_ranking_per_prompt_outside_the_labeling_queue():
    call_command("seed_demo", stdout=StringIO())
    project = Project.objects.get()
    imported = Ranking.objects.filter(item__project=project, source=Ranking.Source.IMPORT)
    assert imported.count() == project.prompts.count()
    ranking = imported.select_related("item__prompt").first()
    texts = {c.pk: c.text for c in ranking.item.prompt.completions.all()}
    best, worst = texts[ranking.groups[0][0]], texts[ranking.groups[-1][0]]
    assert "George Washington" in best and "Lincoln" in worst
    assert ranking.item.is_complete and ranking.item.source == Item.Source.IMPORT
    labeler = get_user_model().objects.get(username="labeler")
    handed_out = services.assignment_next(project=project, user=labeler)
    assert handed_out.item.source == Item.Source.QUEUE


def test_seed_demo_twice_creates_nothing_new_and_says_so():
    call_command("seed_demo", stdout=StringIO())
    counts = (Project.objects.count(), Item.objects.count(), get_user_model().objects.count())
    out = StringIO()
    call_command("seed_demo", stdout=out)
    assert "exists already" in out.getvalue() and "password" not in out.getvalue()
    assert (
        Project.objects.count(),
        Item.objects.count(),
        get_user_model().objects.count(),
    ) == counts


def test_two_seeds_give_different_passwords():
    first = StringIO()
    call_command("seed_demo", stdout=first)
    Project.objects.all().delete()
    get_user_model().objects.all().delete()
    second = StringIO()
    call_command("seed_demo", stdout=second)
    grab = lambda s: re.findall(r"password '([^']+)'", s.getvalue())  # noqa: E731
    assert set(grab(first)).isdisjoint(grab(second))
