"""The Review page in a real Chromium (the issue's browser test): relabel one image, exclude one,
undo one, and the Train page's count follows. A saved review stands in for the backbone's work
(test_review.write_review_result), so the test times the page, not the model."""
from __future__ import annotations

import pytest

from conftest import make_dataset
from finetune_core.data import scan_dataset
import test_e2e_browser as e2e
from test_e2e_browser import choose, fill, wait_idle
from test_review import write_review_result

pytestmark = [pytest.mark.browser, pytest.mark.slow]
server, browser_page = e2e.server, e2e.browser_page  # the browser test's server and Chromium (fixtures)


def train_page_fixes(page, url: str, data) -> str:
    """What the Train page says of the fixes in force for the folder `data`."""
    page.goto(f"{url}/Train")
    wait_idle(page)
    page.get_by_text("A folder path", exact=True).click()
    wait_idle(page)
    fill(page, "Folder", str(data))
    caption = page.get_by_text("Review fixes in force:", exact=False)
    caption.wait_for()
    return caption.inner_text()


def test_review_page_relabel_exclude_undo_in_chromium(server, browser_page):
    page, url = browser_page, server["url"]
    data = make_dataset(server["data"] / "pets", per_class=4, test_per_class=2).resolve()
    write_review_result(data, server["runs"])

    page.goto(f"{url}/Review")
    wait_idle(page)
    fill(page, "Dataset folder", str(data))
    page.get_by_text("2 issues, worst first within each kind", exact=False).wait_for()
    page.get_by_role("checkbox", name="select").first.check(force=True)  # the label issue: cat_0.png
    wait_idle(page)
    choose(page, "Relabel the selected images to", "dog")
    page.get_by_role("button", name="Relabel", exact=True).click()
    wait_idle(page)
    page.get_by_text("1 issues, worst first within each kind", exact=False).wait_for()
    page.get_by_role("checkbox", name="select").first.check(force=True)  # the dark photo: dog_1.png
    wait_idle(page)
    page.get_by_role("button", name="Exclude", exact=True).click()
    wait_idle(page)
    page.get_by_text("No issue left to decide", exact=False).wait_for()
    assert scan_dataset(data).splits["train"] == {"cat": 3, "dog": 4}  # cat_0 is a dog now, dog_1 out
    assert "1 relabelled, 1 excluded" in train_page_fixes(page, url, data)

    page.goto(f"{url}/Review")
    wait_idle(page)
    fill(page, "Dataset folder", str(data))
    page.get_by_role("button", name="Undo").first.click()  # the relabel
    page.get_by_text("Undone: relabel to 'dog'", exact=False).first.wait_for()  # the click reached the server
    wait_idle(page)
    assert scan_dataset(data).splits["train"] == {"cat": 4, "dog": 3}
    shown = train_page_fixes(page, url, data)
    assert "1 excluded" in shown and "relabelled" not in shown
