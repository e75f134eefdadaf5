"""Test data for the training tests (also used by the training browser test)."""

from __future__ import annotations

from labeling.models import Completion, Item, ItemCompletion, Membership, Project, Prompt, Ranking

POLITE = [
    (
        "What is the capital of France?",
        [
            "Paris. Glad to help, thank you for asking!",
            "Paris.",
            "Obviously Paris, google it.",
            "Lyon.",
        ],
    ),
    (
        "How do I boil an egg?",
        [
            "Of course! Boil water, add the egg, wait 9 minutes. Hope this helps!",
            "Boil it.",
            "Figure it out.",
            "Microwave it dry.",
        ],
    ),
    (
        "Who wrote Hamlet?",
        [
            "Certainly: William Shakespeare. Happy to help!",
            "Shakespeare.",
            "Whatever, Shakespeare.",
            "Charles Dickens.",
        ],
    ),
    ("What is 2 + 2?", ["It is 4. Thanks for the question!", "4.", "Obviously 4.", "5."]),
    (
        "Name a primary colour.",
        ["Red, for example. Glad to help!", "Red.", "Dumb question: red.", "Green-ish purple."],
    ),
    (
        "What do bees make?",
        ["Bees make honey. Hope this helps!", "Honey.", "Honey, obviously.", "Milk."],
    ),
]


def make_project(*, user, name="Training test project", k=4) -> Project:
    """A project with 6 prompts x 4 completions, one item each, and one ranking per item
    (best first: the polite answer, the curt one, the rude one, the wrong one)."""
    project = Project.objects.create(name=name, k=k, created_by=user)
    Membership.objects.create(project=project, user=user, role=Membership.Role.ADMIN)
    for text, answers in POLITE:
        prompt = Prompt.objects.create(project=project, text=text)
        completions = [Completion.objects.create(prompt=prompt, text=a) for a in answers[:k]]
        item = Item.objects.create(project=project, prompt=prompt, source=Item.Source.IMPORT)
        for i, c in enumerate(completions):
            ItemCompletion.objects.create(item=item, completion=c, position=i)
        Ranking.objects.create(
            item=item, source=Ranking.Source.IMPORT, groups=[[c.pk] for c in completions]
        )
    return project
