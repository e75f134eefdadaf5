"""A labeler logs in, ranks 4 responses by keyboard, then by drag and drop, submits, and gets
the next (preloaded) item without a page load; the stored rankings match what was shown."""

import pytest
from django.contrib.auth import get_user_model

from labeling import services
from labeling.models import Assignment, Flag, Item, Ranking

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PASSWORD = "e2e-labeler-password-1"


@pytest.fixture
def setup():
    User = get_user_model()
    admin = User.objects.create_user("e2e-admin", password="e2e-admin-password-1")
    labeler = User.objects.create_user("e2e-labeler", password=PASSWORD)
    project = services.project_create(
        name="E2E project", created_by=admin, instructions="Rank **best** first.", k=4
    )
    services.membership_set(project=project, user=labeler, role="labeler")
    for i in range(4):
        prompt = services.prompt_create(project=project, text=f"Question {i}: what is {i} + {i}?")
        texts = ["Curt.", "A *polite* answer.", "```\n" + "x = 1; " * 30 + "\n```", "- a\n- list"]
        for j, text in enumerate(texts):
            services.completion_create(prompt=prompt, text=f"{text} ({i}.{j})")
        services.items_create_for_prompt(project=project, prompt=prompt)
    return project, labeler


def _shown(page):
    """(item id, completion ids in screen order: response 1, 2, 3, 4)."""
    item_id = int(page.get_attribute("#item", "data-item-id"))
    ids = page.eval_on_selector_all(
        "#responses .response", "cards => cards.map(c => Number(c.dataset.completionId))"
    )
    return item_id, ids


def _wait_for_new_item(page, old_item_id, done):
    page.wait_for_function(
        "([old, done]) => { const el = document.getElementById('item');"
        " return el && el.dataset.itemId !== String(old)"
        " && document.getElementById('done-count').textContent.trim() === String(done); }",
        arg=[old_item_id, done],
    )


def test_a_labeler_ranks_by_keyboard_and_by_drag_and_drop(live_server, page, setup):
    project, labeler = setup
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", "e2e-labeler")
    page.fill("#id_password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(f"{live_server.url}/")
    page.click(f"[data-project-id='{project.pk}'] a.button.primary")
    page.wait_for_selector("#item[data-item-id] .response")
    assert page.inner_text("#done-count").strip() == "0"
    page.evaluate("window.__sameDocument = true")

    # 1. Keyboard: 3, 1, Backspace (undo), 1, T (tie), 4, 2, Enter  ->  [[r3], [r1, r4], [r2]]
    first_item, ids = _shown(page)
    assert len(ids) == 4
    page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not a field
    for key in ["3", "1", "Backspace", "1", "t", "4", "2"]:
        page.keyboard.press(key)
    assert page.locator("#ranking .rank-group").count() == 3
    assert page.locator("#ranking .rank-group.tie .chip").count() == 2
    assert page.is_enabled("#submit-ranking")
    page.keyboard.press("Enter")
    _wait_for_new_item(page, first_item, 1)

    ranking = Ranking.objects.get(item_id=first_item, user=labeler)
    assert ranking.groups == [[ids[2]], [ids[0], ids[3]], [ids[1]]]
    assert ranking.display_order == ids
    assert ranking.seconds_spent is not None and ranking.seconds_spent > 0

    # 2. Drag and drop: 4, 1, 2 onto "next rank", then 3 onto rank 2 (a tie) -> [[r4], [r1, r3], [r2]]
    second_item, ids2 = _shown(page)
    assert second_item != first_item
    for n in (4, 1, 2):
        page.drag_and_drop(f"#response-{n}", "#new-rank")
    page.drag_and_drop("#response-3", "#ranking .rank-group[data-rank='2']")
    assert page.locator("#ranking .rank-group").count() == 3
    page.fill("#rationale", "Response 4 is right and polite.")
    page.click("#submit-ranking")
    _wait_for_new_item(page, second_item, 2)
    page.wait_for_selector("body[data-preload='done']")

    ranking2 = Ranking.objects.get(item_id=second_item, user=labeler)
    assert ranking2.groups == [[ids2[3]], [ids2[0], ids2[2]], [ids2[1]]]
    assert ranking2.display_order == ids2
    assert ranking2.rationale == "Response 4 is right and polite."
    assert page.evaluate("window.__sameDocument") is True  # no full page load in between

    # 3. The third item was preloaded: it is on screen; flag it with F and a reason.
    third_item, _ = _shown(page)
    assert third_item not in (first_item, second_item)
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("f")
    page.fill("#flag-reason", "The answers are numbered oddly.")
    page.click("#flag-confirm")  # no category picked: the dialog stays open
    assert page.is_visible("#flag-dialog")
    page.check("input[name='flag-category'][value='broken']")
    page.click("#flag-confirm")
    page.wait_for_function(
        "old => document.getElementById('item').dataset.itemId !== String(old)", arg=third_item
    )
    flag = Flag.objects.get(item_id=third_item)
    assert (flag.category, flag.reason) == ("broken", "The answers are numbered oddly.")

    # 4. The fourth item: S skips it, and the queue is empty.
    fourth_item, _ = _shown(page)
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("s")
    page.wait_for_selector("#queue-empty")
    assert Assignment.objects.get(item_id=fourth_item, user=labeler).status == "skipped"
    assert Ranking.objects.filter(user=labeler).count() == 2
    assert Item.objects.filter(project=project, is_complete=True).count() == 2
    assert page.evaluate("window.__sameDocument") is True


def test_the_ranking_page_fits_a_phone_screen(live_server, browser, setup):
    project, labeler = setup
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    try:
        page.goto(f"{live_server.url}/accounts/login/")
        page.fill("#id_username", "e2e-labeler")
        page.fill("#id_password", PASSWORD)
        page.click("#login-submit")
        page.wait_for_url(f"{live_server.url}/")
        page.goto(f"{live_server.url}/projects/{project.pk}/label/")
        page.wait_for_selector("#item .response")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1
        # every response card fits in the column (a long code line scrolls inside its block)
        widest = page.evaluate(
            "Math.max(...[...document.querySelectorAll('.response, .ranking-panel')]"
            ".map(e => e.getBoundingClientRect().right))"
        )
        assert (
            widest
            <= page.evaluate("document.getElementById('prompt').getBoundingClientRect().right") + 1
        )
        item_id, ids = _shown(page)
        for n in (2, 1, 4, 3):  # tap "Rank next" on each card: no keyboard or drag on a phone
            page.click(f"#response-{n} .place")
        page.click("#submit-ranking")
        _wait_for_new_item(page, item_id, 1)
        assert Ranking.objects.get(item_id=item_id).groups == [
            [ids[1]],
            [ids[0]],
            [ids[3]],
            [ids[2]],
        ]
        page.wait_for_selector("body[data-preload='done']")  # no request left in flight
    finally:
        context.close()


def _login(page, live_server):
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", "e2e-labeler")
    page.fill("#id_password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(f"{live_server.url}/")


def test_chips_show_each_responses_start_and_a_drop_between_two_ranks_makes_a_new_rank(
    live_server, page, setup
):
    project, labeler = setup
    _login(page, live_server)
    page.goto(f"{live_server.url}/projects/{project.pk}/label/")
    page.wait_for_selector("#item .response")
    item_id, ids = _shown(page)
    page.locator("body").click(position={"x": 5, "y": 5})
    for key in ["1", "2", "3"]:
        page.keyboard.press(key)
    # each chip shows its number and the start of its response's text, not only "Response N"
    for n in (1, 2, 3):
        start = page.inner_text(f"#response-{n} .markdown").split()[0]
        chip = page.locator(f"#ranking .rank-group[data-rank='{n}'] .chip")
        assert chip.locator(".chip-key").inner_text() == str(n)
        assert chip.locator(".chip-text").inner_text().startswith(start)
    # response 4 dropped between ranks 1 and 2 becomes rank 2; the others move down
    page.drag_and_drop("#response-4", "#ranking .rank-gap[data-before='2']")
    assert page.locator("#ranking .rank-group").count() == 4
    # a ranked chip dropped above rank 1 becomes the new best
    page.drag_and_drop(
        f"#ranking .chip[data-completion-id='{ids[2]}']", "#ranking .rank-gap[data-before='1']"
    )
    ranks = page.eval_on_selector_all(
        "#ranking .rank-group",
        "gs => gs.map(g => [...g.querySelectorAll('.chip')].map(c => Number(c.dataset.completionId)))",
    )
    assert ranks == [[ids[2]], [ids[0]], [ids[3]], [ids[1]]]
    page.click("#submit-ranking")
    _wait_for_new_item(page, item_id, 1)
    assert Ranking.objects.get(item_id=item_id, user=labeler).groups == ranks
    page.wait_for_selector("body[data-preload='done']")


def test_a_labeler_revises_a_recent_ranking_and_sees_which_one_counts(live_server, page, setup):
    project, labeler = setup
    _login(page, live_server)
    page.goto(f"{live_server.url}/projects/{project.pk}/label/")
    page.wait_for_selector("#item .response")
    item_id, ids = _shown(page)
    page.locator("body").click(position={"x": 5, "y": 5})
    for key in ["1", "2", "3", "4"]:
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    _wait_for_new_item(page, item_id, 1)
    page.wait_for_selector("body[data-preload='done']")

    page.click("#my-rankings-link")
    page.wait_for_selector("#my-rankings")
    assert "is the one that counts" in page.inner_text("#which-counts")
    page.click(f"#my-rankings tr[data-item-id='{item_id}'] .revise-link")
    page.wait_for_selector("#item[data-mode='revise'] .response")
    assert page.locator("#skip-item").count() == 0
    # the page opens set to the ranking that counts now, in the order the labeler saw
    assert _shown(page) == (item_id, ids)
    assert page.locator("#ranking .rank-group").count() == 4
    # move response 1 from best to worst: unrank it, then rank it next (last)
    page.click(f"#ranking .chip[data-completion-id='{ids[0]}'] .chip-remove")
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("1")
    page.fill("#rationale", "Response 1 is curt after all.")
    page.keyboard.press("Tab")
    page.click("#submit-ranking")
    page.wait_for_url(f"{live_server.url}/projects/{project.pk}/my-rankings/")
    row = page.inner_text(f"#my-rankings tr[data-item-id='{item_id}'] .counts")
    assert "your revision of" in row and "1 earlier version kept" in row
    ranking = Ranking.objects.get(item_id=item_id, user=labeler)
    assert ranking.groups == [[ids[1]], [ids[2]], [ids[3]], [ids[0]]]
    assert ranking.rationale == "Response 1 is curt after all."
    assert ranking.revisions.get().groups == [[c] for c in ids]


def test_the_flag_dialog_asks_for_details_only_while_other_is_chosen(live_server, page, setup):
    project, labeler = setup
    _login(page, live_server)
    page.goto(f"{live_server.url}/projects/{project.pk}/label/")
    page.wait_for_selector("#item .response")
    item_id, _ = _shown(page)
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("f")
    assert page.is_hidden("#flag-reason-error")
    # "Other" with no details: the dialog stays open and says why, in words on the page
    page.check("input[name='flag-category'][value='other']")
    page.click("#flag-confirm")
    assert page.is_visible("#flag-dialog")
    page.wait_for_selector("#flag-reason-error", state="visible")
    assert 'Details are needed for "Other"' in page.inner_text("#flag-reason-error")
    assert not Flag.objects.filter(item_id=item_id).exists()
    # another category: details are optional again, the message goes, and it submits
    page.check("input[name='flag-category'][value='wrong_language']")
    assert page.is_hidden("#flag-reason-error")
    assert page.evaluate("document.getElementById('flag-reason').required") is False
    page.click("#flag-confirm")
    page.wait_for_function(
        "old => document.getElementById('item').dataset.itemId !== String(old)", arg=item_id
    )
    flag = Flag.objects.get(item_id=item_id)
    assert (flag.category, flag.reason) == ("wrong_language", "")
    # the dialog opens clean for the next item: "Other" with details submits
    next_item, _ = _shown(page)
    page.wait_for_selector("body[data-preload='done']")
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("f")
    assert page.is_hidden("#flag-reason-error")
    page.check("input[name='flag-category'][value='other']")
    page.fill("#flag-reason", "The prompt is a duplicate.")
    page.click("#flag-confirm")
    page.wait_for_function(
        "old => document.getElementById('item').dataset.itemId !== String(old)", arg=next_item
    )
    flag = Flag.objects.get(item_id=next_item)
    assert (flag.category, flag.reason) == ("other", "The prompt is a duplicate.")


def test_an_unchanged_revision_stores_nothing_and_says_so(live_server, page, setup):
    project, labeler = setup
    _login(page, live_server)
    page.goto(f"{live_server.url}/projects/{project.pk}/label/")
    page.wait_for_selector("#item .response")
    item_id, ids = _shown(page)
    page.locator("body").click(position={"x": 5, "y": 5})
    for key in ["2", "1", "t", "3", "4"]:  # a tie, too: [[r2], [r1, r3], [r4]]
        page.keyboard.press(key)
    page.fill("#rationale", "Two is best.")
    page.click("#submit-ranking")
    _wait_for_new_item(page, item_id, 1)
    page.wait_for_selector("body[data-preload='done']")
    ranking = Ranking.objects.get(item_id=item_id, user=labeler)
    stored = (ranking.groups, ranking.rationale)

    page.goto(f"{live_server.url}/projects/{project.pk}/my-rankings/")
    page.click(f"#my-rankings tr[data-item-id='{item_id}'] .revise-link")
    page.wait_for_selector("#item[data-mode='revise'] .response")
    page.click("#submit-ranking")  # nothing changed
    page.wait_for_url(f"{live_server.url}/projects/{project.pk}/my-rankings/")
    assert "No change: your ranking is as it was" in page.inner_text("body")
    row = page.inner_text(f"#my-rankings tr[data-item-id='{item_id}'] .counts")
    assert row == "this ranking"
    ranking.refresh_from_db()
    assert (ranking.groups, ranking.rationale) == stored and ranking.revised_at is None
    assert not ranking.revisions.exists()

    # the same groups with the tie picked in the other order: still the same ranking
    page.click(f"#my-rankings tr[data-item-id='{item_id}'] .revise-link")
    page.wait_for_selector("#item[data-mode='revise'] .response")
    page.click(f"#ranking .chip[data-completion-id='{ids[0]}'] .chip-remove")
    page.drag_and_drop("#response-1", "#ranking .rank-group[data-rank='2']")
    page.click("#submit-ranking")
    page.wait_for_url(f"{live_server.url}/projects/{project.pk}/my-rankings/")
    assert "No change: your ranking is as it was" in page.inner_text("body")
    assert not ranking.revisions.exists()

    # a new rationale alone is a revision: it is part of what is stored
    page.click(f"#my-rankings tr[data-item-id='{item_id}'] .revise-link")
    page.wait_for_selector("#item[data-mode='revise'] .response")
    page.fill("#rationale", "Two is best; three and one tie.")
    page.click("#submit-ranking")
    page.wait_for_url(f"{live_server.url}/projects/{project.pk}/my-rankings/")
    assert "No change" not in page.inner_text("body")
    row = page.inner_text(f"#my-rankings tr[data-item-id='{item_id}'] .counts")
    assert "your revision of" in row and "1 earlier version kept" in row
    ranking.refresh_from_db()
    assert ranking.rationale == "Two is best; three and one tie."
    assert ranking.revisions.get().rationale == "Two is best."
