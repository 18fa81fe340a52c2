"""unclip-batch report: the page over a real job's output, checked in a real browser (headless chromium)."""

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
from helpers import REPO, job, read_output

from unclip_batch.job import run_job
from unclip_batch.report import write_report
from unclip_batch.storage import Location, Stores

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo_output(ray_local, tmp_path_factory):
    """The demo manifest (every task, and a row whose source is missing) through the null model: the page is
    about what the job recorded, not about pixels (null draws noise, and returns a source as its variation)."""
    output = tmp_path_factory.mktemp("report") / "out"
    run_job(job([str(REPO / "manifests" / "demo.parquet")], str(output), model="null"))
    return output


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("UNCLIP_BATCH_REQUIRE_BROWSER"):  # CI installs it (.ci/run): never skip there
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def visit(browser, url: str, screenshot: Path | None = None) -> dict:
    """Load the page; what a user would see go wrong: images that did not load, console errors, failed requests."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems = {"console": [], "failed": []}
    page.on("console", lambda m: problems["console"].append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems["failed"].append(r.url))
    page.goto(url)
    page.wait_for_load_state("load")
    images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    seen = {
        "images": images,
        "summary": page.inner_text("#summary"),
        "codes": page.inner_text("#codes"),
        "records": page.inner_text("#records"),
        "figures": page.locator("figure").count(),
        **problems,
    }
    if screenshot:
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return seen


def test_the_report_shows_every_image_and_error_opened_from_disk_or_served(demo_output, browser):
    url = write_report(Location(str(demo_output)))
    assert url == f"{demo_output}/report/index.html"
    metadata, errors = read_output(demo_output)
    served = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(demo_output))
    )
    threading.Thread(target=served.serve_forever, daemon=True).start()
    try:
        shot = demo_output.parent / "screenshot.png"
        pages = [
            visit(browser, f"file://{url}", shot),
            visit(browser, f"http://127.0.0.1:{served.server_port}/report/"),
        ]
    finally:
        served.shutdown()
    for seen in pages:
        assert seen["console"] == [] and seen["failed"] == [], seen
        assert seen["images"] and all(loaded for _, loaded in seen["images"]), seen["images"]
        # Every image of the job, each once, plus the sources and masks of variations and inpaints.
        outputs = sorted(src for src, _ in seen["images"] if src.startswith("../images/"))
        assert outputs == sorted(f"../{key}" for key in metadata["image_key"].to_pylist())
        assert {src for src, _ in seen["images"] if src.startswith("sources/")} >= {
            "sources/variation-circle-image.png",
            "sources/inpaint-mask-image.png",
            "sources/inpaint-mask-mask.png",
        }
        assert seen["figures"] == metadata.num_rows
        assert "rows failed\t1" in seen["summary"] and "images\t15" in seen["summary"]
        assert "image_unreadable\t1" in seen["codes"]
        assert "broken-source" in seen["records"] and "does_not_exist.png does not exist" in seen["records"]
    assert errors.num_rows == 1
    assert shot.stat().st_size > 10_000  # a page was drawn
    assert not (demo_output / "_partial").exists()


def test_the_report_of_an_unfinished_job_says_so_and_writes_to_object_storage(demo_output, s3, browser):
    fs = s3.filesystem()
    fs.mkdir("reports")
    for path in demo_output.rglob("*"):
        if path.is_file() and path.name != "_SUCCESS" and "report" not in path.parts:
            fs.put_file(str(path), f"reports/out/{path.relative_to(demo_output)}")
    stores = Stores(s3.storage_options, ["s3://reports/out"])
    url = write_report(stores.location("s3://reports/out"), stores)
    assert url == "s3://reports/out/report/index.html"
    page = fs.cat_file("reports/out/report/index.html").decode()
    assert "incomplete: no _SUCCESS yet" in page
    # Every link of the page names an object that is there, relative to the page.
    for src in {part.split("'")[0] for part in page.split("src='")[1:]}:
        key = os.path.normpath(f"reports/out/report/{src}")
        assert fs.exists(key), src


def test_the_curation_section_shows_counts_the_histogram_and_duplicate_groups(browser, tmp_path, monkeypatch):
    from test_curate import SHARDS, inline, write_output

    from unclip_batch.curation import CurateConfig, curate

    inline(monkeypatch)  # the stages in this process: the page is about what curate recorded
    output = write_output(tmp_path / "out", SHARDS)
    curate(CurateConfig(output=output, min_clip_score=0.1))
    url = write_report(Location(output))
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(r.url))
    page.goto(f"file://{url}")
    page.wait_for_load_state("load")
    assert problems == []
    assert "Curation: 4 of 9 images kept" in page.inner_text("#curation")
    assert "near_duplicate\t2" in page.inner_text("#reasons") and "low_clip_score\t1" in page.inner_text("#reasons")
    assert page.locator("#clip-histogram rect").count() >= 5 and page.locator("#threshold").count() == 1
    assert "rows whose images are all near-duplicates\t0.0%" in page.inner_text("#diversity")
    groups = page.evaluate(
        "[...document.querySelectorAll('.group')].map(g => [...g.querySelectorAll('figure')].map(f => "
        "[f.querySelector('img').getAttribute('src'), f.querySelector('img').naturalWidth > 0, f.innerText]))"
    )
    # The largest group first (h, with a/1 and c), then by key: b's (a/0), f's (e); the kept image first.
    assert [[src for src, _, _ in g] for g in groups] == [
        ["../images/h/0.png", "../images/a/1.png", "../images/c/0.png"],
        ["../images/b/0.png", "../images/a/0.png"],
        ["../images/f/0.png", "../images/e/0.png"],
    ]
    assert all(loaded for g in groups for _, loaded, _ in g), groups
    assert [text for _, _, text in groups[0]][0] == "kept" and groups[0][1][2].startswith("near 0.99")
    assert groups[1][1][2] == "exact 1.000"
    page.close()
