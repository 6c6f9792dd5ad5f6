"""A real headless Chromium for console tests: Debian's ``chromium`` driven by Playwright.

Playwright's own browser download is never used (``playwright install`` fetches from the
internet); the test command installs Debian's package as it installs Mosquitto.
Screenshots go to ``test-output/console`` in the repository (ignored by git), or to
$EDGEFLEET_SCREENSHOTS when set, so a reviewer can open them after a run or a CI job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# A tablet held upright and a small laptop: the console must be usable at both widths.
TABLET = {"width": 820, "height": 1180}
LAPTOP = {"width": 1366, "height": 900}
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


@contextmanager
def chromium() -> Iterator[Browser]:
    """A launched browser; skips when chromium is not installed."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup_env.sh installs it)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot_folder(name: str) -> Path:
    """Where a test's screenshots go, emptied of an earlier run's."""
    extra = os.environ.get("EDGEFLEET_SCREENSHOTS", "")
    folder = Path(extra) if extra else OUTPUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


class Screenshots:
    """Full-page screenshots numbered in the order taken."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.taken: list[Path] = []

    def take(self, page: Page, name: str) -> Path:
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        return path


def fits_width(page: Page) -> bool:
    """No sideways scrolling of the page itself (wide tables scroll inside their own box)."""
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))
