"""Fixtures of the labeling tests: a factory that fills a project with prompts, completions and
items (the personas and `project` come from tests/conftest.py)."""

import pytest

from labeling import services
from labeling.models import Completion


@pytest.fixture
def make_items():
    """make_items(project, n, k=None, texts=None) -> list[Item]: n prompts, one item each."""

    def make(project, n, k=None, texts=None):
        k = k or project.k
        items = []
        for i in range(n):
            prompt = services.prompt_create(project=project, text=f"Prompt {i}: what is {i} + {i}?")
            for j in range(k):
                text = texts[j] if texts else f"Answer {j} to prompt {i}"
                services.completion_create(
                    prompt=prompt, text=text, source=Completion.Source.IMPORT
                )
            items += services.items_create_for_prompt(project=project, prompt=prompt)
        return items

    return make
