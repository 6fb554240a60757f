"""Headless Chromium for the tests that look at rendered HTML (reports, feature browser)."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def chromium_page(errors: list[str]) -> Iterator[Any]:
    """A page of headless Chromium (Debian ``chromium`` driven by Playwright) that appends
    console errors and uncaught page errors to ``errors``; skips without them."""
    if shutil.which("chromium") is None or importlib.util.find_spec("playwright") is None:
        pytest.skip("needs chromium and the playwright package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu"],
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page
        finally:
            browser.close()
