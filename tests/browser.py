"""Headless Chromium for the browser tests, through Playwright's Python package.

Playwright's own browser download cannot be reached from the development machines, so the tests
drive the system's Chromium (Debian's `chromium` package, which `make test` installs). Without
it the tests fail and say how to install it; they skip only when told to, by setting
IMAGETRANSFORMER_SKIP_BROWSER_TESTS=1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

SKIP_VARIABLE = "IMAGETRANSFORMER_SKIP_BROWSER_TESTS"
SCREENSHOT_VARIABLE = "IMAGETRANSFORMER_SCREENSHOTS"  # a folder: the tests save their pages there
# Flags for a sandbox with no network: no background connections, no first-run work.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str:
    """The system Chromium, or a failed (never silently skipped) test naming the fix."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"browser tests skipped on request ({SKIP_VARIABLE}=1)")
    found = os.environ.get("IMAGETRANSFORMER_CHROMIUM") or shutil.which("chromium")
    if not found:
        found = shutil.which("chromium-browser")
    if not found:
        pytest.fail(
            "the browser tests need Chromium: apt-get install -y chromium (make test does it), "
            f"or set IMAGETRANSFORMER_CHROMIUM=/path/to/chrome; {SKIP_VARIABLE}=1 skips them"
        )
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("the browser tests need Playwright: pip install -e '.[dev]' (make test does)")
    return found


@contextlib.contextmanager
def browser() -> Iterator[object]:
    """A headless Chromium (Playwright `Browser`), closed afterwards."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """Save the page as NAME.png in tmp_path, and in $IMAGETRANSFORMER_SCREENSHOTS when set."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    folder = os.environ.get(SCREENSHOT_VARIABLE)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(folder) / f"{name}.png")
    return path
