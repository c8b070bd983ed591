"""The page at `/`, in a real headless browser (the system's Chromium, driven by Playwright), against the real
server with the bundled Fashion-MNIST model: an example image gives the right label and a heatmap, with and
without a token. `make setup` installs Chromium where apt-get can; without a browser the test is skipped
and says why. The screenshot in docs/images/ is written by `python tests/server/test_http_page.py`."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import pytest

from serving.repository_format import BUNDLED_REPOSITORY
from tests.conftest import running_server
from tests.server.test_security import INFERENCE_TOKEN

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "images"
SCREENSHOT = ROOT / "docs" / "images" / "rest_page.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@contextlib.contextmanager
def browser_page():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [dev] extra)")
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine: `make setup` installs it with apt-get where it can "
                    "(apt-get install -y chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 620})
            yield page
        finally:
            browser.close()


def classify(page, url: str, image: Path, token: str = "") -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    if token:
        page.fill("#token", token)
        page.dispatch_event("#token", "change")
    # selectors, not wait_for_function: the page's Content-Security-Policy forbids the eval that one needs
    page.wait_for_selector("#model option", state="attached", timeout=15000)
    page.set_input_files("#file", str(image))
    page.wait_for_selector(f"#caption:has-text('{image.name}')", timeout=30000)
    page.wait_for_selector("#view[data-cam-class]:not([data-cam-class=''])", state="attached", timeout=30000)
    assert not errors, errors
    return page.locator("#top li .label").all_inner_texts()


def heatmap_spread(page) -> float:
    """The spread of the red channel over the canvas: the image alone (grey) has none where it is flat; the
    heatmap's colours make it large."""
    return page.evaluate("""() => {
        const c = document.querySelector('#view');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0, mix = 0;
        for (let i = 0; i < d.length; i += 4) {
            lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]);
            mix += Math.abs(d[i] - d[i + 2]);
        }
        return mix / (d.length / 4);
    }""")


def test_page_classifies_an_example_and_draws_its_heatmap():
    with running_server(BUNDLED_REPOSITORY, http_port=0) as server, browser_page() as page:
        url = f"http://127.0.0.1:{server.server.http_port}/"
        labels = classify(page, url, EXAMPLES / "bag.png")
        assert labels[0] == "Bag" and len(labels) == 5
        scores = [float(s.rstrip("%")) for s in page.locator("#top li .score").all_inner_texts()]
        assert scores == sorted(scores, reverse=True) and 90 < scores[0] <= 100
        with_heat = heatmap_spread(page)
        page.uncheck("#overlay")
        without = heatmap_spread(page)
        assert with_heat > 5 * max(without, 1.0), (with_heat, without)  # grey image: red == blue
        page.check("#overlay")
        # another class's map: the page asks the server for it
        page.locator("#top li button").nth(2).click()
        chosen = page.locator("#top li button").nth(2).get_attribute("data-index")
        page.wait_for_selector(f"#view[data-cam-class='{chosen}']", state="attached", timeout=15000)
        assert page.locator("#top li button").nth(2).get_attribute("aria-pressed") == "true"
        labels = classify(page, url, EXAMPLES / "ankle_boot.png")
        assert labels[0] == "Ankle boot"


def test_page_with_a_token():
    with running_server(BUNDLED_REPOSITORY, http_port=0, inference_tokens=(INFERENCE_TOKEN,)) as server, \
            browser_page() as page:
        url = f"http://127.0.0.1:{server.server.http_port}/"
        page.goto(url)
        page.wait_for_selector("#status.error", timeout=15000)
        assert "token" in page.locator("#status").inner_text()
        assert classify(page, url, EXAMPLES / "coat.png", token=INFERENCE_TOKEN)[0] == "Coat"
        # the token is in the page's memory only: nothing stored
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0
        assert INFERENCE_TOKEN not in page.url


def write_screenshot() -> None:
    with running_server(BUNDLED_REPOSITORY, http_port=0) as server, browser_page() as page:
        classify(page, f"http://127.0.0.1:{server.server.http_port}/", EXAMPLES / "coat.png")
        page.screenshot(path=str(SCREENSHOT))
    print(SCREENSHOT)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    write_screenshot()
