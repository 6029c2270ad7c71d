"""An evaluation's report.html in a real browser (headless Chromium, Debian's `chromium` package, driven by
playwright): no console errors, no request leaves the file (it must work offline), the charts are there
with a size, and the page fits a 1280-pixel-wide window. The screenshot is kept as an artifact (in the
test's folder, and in $CPTKIT_ARTIFACTS when set)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from test_chat_drift import chat_model_dir  # noqa: F401 (a fixture)
from test_evaluate import trained_run

WIDTH = 1280


def chromium() -> str:
    """The system's Chromium, or a skip that says what is missing."""
    path = os.environ.get("CPTKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; `make browser` does it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return path


def render(report: Path, screenshot: Path) -> dict[str, Any]:
    """Open the report offline in a WIDTH-pixel window; what the page logged and requested, its width and
    its images' sizes; a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium())
        try:
            context = browser.new_context(viewport={"width": WIDTH, "height": 900}, offline=True)
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri(), wait_until="load")
            facts = page.evaluate(
                """() => ({
                    scrollWidth: document.documentElement.scrollWidth,
                    clientWidth: document.documentElement.clientWidth,
                    images: [...document.images].map(i => ({
                        alt: i.alt, natural: i.naturalWidth, width: i.getBoundingClientRect().width,
                        height: i.getBoundingClientRect().height, complete: i.complete})),
                    wide: [...document.querySelectorAll('body *')]
                        .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth)
                        .map(e => e.tagName + ' ' + e.textContent.slice(0, 60)),
                })"""
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {**facts, "errors": errors, "requests": requests}


def test_the_report_renders_in_a_browser(tmp_path: Path, chat_model_dir: Path, cli: Any) -> None:  # noqa: F811
    chromium()
    # What stretched the page before: a long model path (the title) and a generation without spaces.
    model = tmp_path / ("a_model_folder_with_a_long_name_" * 5)
    model.symlink_to(chat_model_dir)
    generation = {"max_new_tokens": 6, "domain_prompts": ["See https://example.org/" + "long_path_" * 30]}
    chat = {"max_instructions": 4, "max_new_tokens": 12, "side_by_side": 2}
    cfg = trained_run(tmp_path, model, min_adaptation=None, max_forgetting=None, generation=generation, chat=chat)
    assert cli("evaluate", "-c", str(cfg)).exit_code == 0
    report = (tmp_path / "outputs/cpt_model/evaluation/report.html").resolve()
    screenshot = tmp_path / "report.png"
    page = render(report, screenshot)

    assert page["errors"] == []
    assert {url for url in page["requests"] if not url.startswith("data:")} == {report.as_uri()}
    assert [i["alt"] for i in page["images"]] == ["base vs adapted", "loss curves"]
    for image in page["images"]:
        assert image["complete"] and image["natural"] > 0 and image["width"] > 100 and image["height"] > 100, image
    assert page["scrollWidth"] <= page["clientWidth"] == WIDTH, page["wide"]
    assert screenshot.stat().st_size > 10_000
    artifacts = os.environ.get("CPTKIT_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artifacts) / "report.png")
