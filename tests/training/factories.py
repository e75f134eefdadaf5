"""Test data for the training tests (also used by the training browser test)."""

from __future__ import annotations

import io
import json

from labeling import services
from labeling.importexport import import_file
from labeling.models import Project

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
    """A project with 6 prompts x `k` completions, one item each, and one imported ranking per
    item (best first: the polite answer, the curt one, the rude one, the wrong one), built
    through the services and the import a person would use."""
    project = services.project_create(name=name, created_by=user, k=k)
    lines = [
        json.dumps({"prompt": text, "completions": answers[:k], "ranking": [[i] for i in range(k)]})
        for text, answers in POLITE
    ]
    import_file(project=project, fileobj=io.BytesIO("\n".join(lines).encode()), fmt="jsonl")
    return project
