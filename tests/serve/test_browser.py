"""The explorer in headless Chromium: from the run view to an image, method, target and layer
changes, a long job cancelled, an image dropped on the page."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from convlens.serve import background
from convlens.serve.explorer import Explorer
from tests.helpers.browser import chromium_page
from tests.helpers.runs import CLASSES, tiny_run

GRADCAM = '.map[data-method="gradcam"]'


def test_explore_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens.serve.explorer import SERVER_CAPS

    monkeypatch.setitem(SERVER_CAPS, "masks", 10**6)  # a job long enough to cancel
    run = tiny_run(tmp_path)
    explorer = Explorer(run.model(), run.run)
    errors: list[str] = []
    with background(explorer) as url, chromium_page(errors) as page:
        page.goto(url)
        assert page.url.endswith("/run/report/index.html")
        # three clicks from the confusion table to "why not the true class?"
        page.click("#pairs a")  # 1: an example of the most confused pair
        page.wait_for_selector(f'{GRADCAM}[data-state="done"]')
        i = page.url.rsplit("/", 1)[1].removesuffix(".html")
        p = next(q for q in explorer.predictions if q.id == i)
        assert p.correct is False
        img = page.locator(f"{GRADCAM} img")
        assert img.get_attribute("data-target") == str(p.pred)
        first = img.get_attribute("src")
        page.click("#why-not")  # 2: the map for the true class
        page.wait_for_function(
            "([sel, t]) => document.querySelector(sel).dataset.target === t",
            arg=[f"{GRADCAM} img", str(p.label)],
        )
        assert img.get_attribute("src") != first
        assert page.locator(f"{GRADCAM} .caption").inner_text().startswith(CLASSES[p.label])

        page.select_option("#layer", "0")  # another layer
        page.wait_for_function(
            "sel => document.querySelector(sel).dataset.layer === '0'", arg=f"{GRADCAM} img"
        )
        page.check('input[name="target"][value="other"]')
        page.fill("#class-search", "coffee mug")  # a class by name
        page.dispatch_event("#class-search", "change")
        page.wait_for_function(
            "sel => document.querySelector(sel).dataset.target === '2'", arg=f"{GRADCAM} img"
        )
        page.check('input[value="saliency"]')  # another method, side by side
        page.wait_for_selector('.map[data-method="saliency"][data-state="done"]')
        assert page.locator(".map").count() == 2

        # a long job shows progress and is cancelled
        page.fill("#options", "rise.masks=200000, rise.batch_size=4")
        page.dispatch_event("#options", "change")
        page.check('input[value="rise"]')
        page.wait_for_selector('.map[data-method="rise"] progress[value]', timeout=5000)
        # the cancel button is the same element while the progress moves on, so a click is
        # never lost to a rebuild of the progress line (seen once in CI)
        button = page.query_selector('.map[data-method="rise"] .cancel')
        assert button is not None
        first = page.eval_on_selector('.map[data-method="rise"] progress', "p => p.value")
        page.wait_for_function(
            "v => document.querySelector('.map[data-method=\"rise\"] progress').value !== v",
            arg=first,
        )
        assert button.evaluate("b => b.isConnected")
        button.click()
        page.wait_for_selector('.map[data-method="rise"][data-state="cancelled"]')
        assert "cancelled" in page.locator('.map[data-method="rise"] .state').inner_text()

        # an image dropped on the page is explained
        buf = io.BytesIO()
        rng = np.random.default_rng(3)
        Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(buf, "PNG")
        page.evaluate(
            """b64 => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""",
            base64.b64encode(buf.getvalue()).decode("ascii"),
        )
        page.wait_for_url("**/image/u*.html")
        page.wait_for_selector(f'{GRADCAM}[data-state="done"]')
        assert page.locator("h1").inner_text() == "dropped.png"

        # the feature browser: a layer, then a channel's top patches and projections
        page.click("text=feature browser")
        page.select_option("#feature-layer", "2")
        page.wait_for_selector("#channels button")
        channel = page.locator("#channels button").first
        c = channel.get_attribute("data-channel")
        channel.click()
        page.wait_for_selector(f'#channel[data-state="done"][data-channel="{c}"]')
        assert page.locator("#channel .example img.projection").count() == 9
    assert errors == []
