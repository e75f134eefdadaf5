"""project_create, membership_set, prompt_create, item_create, items_create_for_prompt."""

import pytest

from labeling import services
from labeling.models import Completion, Item, Membership
from labeling.services import LabelingError

pytestmark = pytest.mark.django_db


def test_project_create_makes_the_creator_an_admin_member(admin_user):
    project = services.project_create(name=" Tone ", created_by=admin_user, k=3, allow_ties=False)
    assert (project.name, project.k, project.allow_ties) == ("Tone", 3, False)
    assert Membership.objects.get(project=project, user=admin_user).role == "admin"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": ""}, "needs a name"),
        ({"name": "x", "k": 1}, "between 2 and 9"),
        ({"name": "x", "k": 10}, "between 2 and 9"),
        ({"name": "x", "annotations_per_item": 0}, "between 1 and 50"),
    ],
)
def test_project_create_rejects_bad_settings_with_a_clear_message(admin_user, kwargs, message):
    with pytest.raises(LabelingError, match=message):
        services.project_create(created_by=admin_user, **kwargs)


def test_membership_set_adds_then_changes_the_role(project, make_user):
    carol = make_user("carol")
    services.membership_set(project=project, user=carol, role="labeler")
    services.membership_set(project=project, user=carol, role="admin")
    assert Membership.objects.get(project=project, user=carol).role == "admin"
    assert Membership.objects.filter(project=project, user=carol).count() == 1


def test_membership_set_rejects_an_unknown_role(project, labeler):
    with pytest.raises(LabelingError, match="Unknown role"):
        services.membership_set(project=project, user=labeler, role="owner")


def test_membership_add_by_username_names_a_missing_user(project):
    with pytest.raises(LabelingError, match="no user named 'ghost'"):
        services.membership_add_by_username(project=project, username="ghost", role="labeler")


def test_prompt_create_builds_text_from_chat_messages(project):
    prompt = services.prompt_create(
        project=project, text="", messages=[{"role": "user", "content": "Hi"}], metadata={"a": 1}
    )
    assert prompt.text == "user: Hi" and prompt.metadata == {"a": 1}


def test_prompt_create_needs_text_or_messages(project):
    with pytest.raises(LabelingError, match="needs text"):
        services.prompt_create(project=project, text="  ")


def test_item_create_keeps_the_completions_in_order(project):
    prompt = services.prompt_create(project=project, text="p")
    cs = [services.completion_create(prompt=prompt, text=f"c{i}") for i in range(3)]
    item = services.item_create(project=project, prompt=prompt, completions=cs)
    assert [ic.completion_id for ic in item.item_completions.all()] == [c.pk for c in cs]


def test_item_create_rejects_completions_of_another_prompt(project):
    p1 = services.prompt_create(project=project, text="p1")
    p2 = services.prompt_create(project=project, text="p2")
    c1 = services.completion_create(prompt=p1, text="a")
    c2 = services.completion_create(prompt=p2, text="b")
    with pytest.raises(LabelingError, match="answer another prompt"):
        services.item_create(project=project, prompt=p1, completions=[c1, c2])


def test_item_create_rejects_a_repeated_completion_and_a_single_one(project):
    prompt = services.prompt_create(project=project, text="p")
    c = services.completion_create(prompt=prompt, text="a")
    with pytest.raises(LabelingError, match="same completion twice"):
        services.item_create(project=project, prompt=prompt, completions=[c, c])
    with pytest.raises(LabelingError, match="2 to 9"):
        services.item_create(project=project, prompt=prompt, completions=[c])


def test_items_create_for_prompt_groups_unused_completions_by_k(project):
    prompt = services.prompt_create(project=project, text="p")
    for i in range(9):
        services.completion_create(prompt=prompt, text=f"c{i}", source=Completion.Source.MODEL)
    items = services.items_create_for_prompt(project=project, prompt=prompt)
    assert len(items) == 2  # 9 completions, K=4: two items, one completion waits
    assert services.items_create_for_prompt(project=project, prompt=prompt) == []
    for i in range(3):
        services.completion_create(prompt=prompt, text=f"more{i}")
    assert len(services.items_create_for_prompt(project=project, prompt=prompt)) == 1
    shown = [ic.completion_id for item in Item.objects.all() for ic in item.item_completions.all()]
    assert len(shown) == len(set(shown)) == 12


def test_a_sampled_completion_with_a_nul_byte_is_stored_with_a_replacement_character(project):
    prompt = services.prompt_create(project=project, text="Say something.")
    c = services.completion_create(
        prompt=prompt, text="ab\x00cd", source=Completion.Source.MODEL, model_name="m"
    )
    c.refresh_from_db()  # PostgreSQL refuses a NUL in text; the test database is PostgreSQL in CI
    assert c.text == "ab\ufffdcd"
