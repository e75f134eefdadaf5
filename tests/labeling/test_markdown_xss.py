"""Markdown is rendered (code blocks, lists) and sanitized: script tags, event handlers and
javascript: links in prompts, completions or instructions stay inert on the ranking page."""

from html.parser import HTMLParser

import pytest
from django.test import Client
from django.urls import reverse

from labeling import services
from labeling.templatetags.labeling_markdown import markdown_to_safe_html

PAYLOADS = [
    "<script>alert('x1')</script>",
    '<img src="x" onerror="alert(\'x2\')">',
    "[click me](javascript:alert('x3'))",
    "<a href=\"javascript:alert('x4')\">raw link</a>",
    "![img](javascript:alert('x5'))",
    "<svg onload=\"alert('x6')\"></svg>",
    '<iframe src="https://evil.example"></iframe>',
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    '<div style="background:url(javascript:alert(1))" onclick="alert(\'x7\')">d</div>',
]


class _Tags(HTMLParser):
    """Every real element and attribute of a document (text that merely looks like a tag,
    such as an escaped "<script>", is text and not collected)."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))


def _assert_inert(html: str):
    parser = _Tags()
    parser.feed(html)
    for tag, attrs in parser.tags:
        assert tag not in {"script", "iframe", "svg", "object", "embed", "style"}, tag
        for name, value in attrs:
            assert not name.startswith("on"), f"<{tag} {name}=...> survived"
            assert name != "style", f"<{tag} style=...> survived"
            if name in {"href", "src", "action", "formaction"}:
                scheme = (value or "").strip().lower()
                assert not scheme.startswith(("javascript:", "data:", "vbscript:")), (
                    f"<{tag} {name}={value}>"
                )


@pytest.mark.parametrize("payload", PAYLOADS)
def test_render_markdown_leaves_payloads_inert(payload):
    _assert_inert(markdown_to_safe_html(payload))


def test_render_markdown_keeps_code_blocks_lists_and_safe_links():
    html = markdown_to_safe_html(
        "Steps:\n\n1. one\n2. two\n\n- a\n- b\n\n```python\nprint('<b>')\n```\n\n[docs](https://example.org)"
    )
    assert "<ol>" in html and "<ul>" in html and "<li>a</li>" in html
    assert "<code class=\"language-python\">print('&lt;b&gt;')" in html
    assert 'href="https://example.org"' in html and 'rel="noopener noreferrer nofollow"' in html


@pytest.mark.django_db
def test_payloads_in_prompts_completions_and_instructions_are_inert_on_the_page(
    admin_user, labeler
):
    joined = "\n\n".join(PAYLOADS)
    project = services.project_create(
        name="<script>alert('name')</script>", created_by=admin_user, instructions=joined
    )
    services.membership_set(project=project, user=labeler, role="labeler")
    prompt = services.prompt_create(project=project, text=joined)
    completions = [
        services.completion_create(prompt=prompt, text=f"{p}\n\nanswer {i}")
        for i, p in enumerate(PAYLOADS[:4])
    ]
    services.item_create(project=project, prompt=prompt, completions=completions)
    client = Client()
    client.force_login(labeler)
    html = client.get(reverse("labeling:label", args=[project.pk])).content.decode()
    assert "answer 3" in html
    body = html.split("<main", 1)[1].split("</main>", 1)[
        0
    ]  # the page's own <script src> is after main
    _assert_inert(body)
    assert "&lt;script&gt;alert(&#x27;name&#x27;)&lt;/script&gt;" in html
