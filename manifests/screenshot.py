"""Screenshot a job's report page with headless chromium (the README's picture of it).

python manifests/screenshot.py out/demo manifests/demo_report.png   # after make demo (which writes the report)
"""

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(output: str, target: str) -> None:
    page_url = (Path(output).resolve() / "report" / "index.html").as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(page_url)
        page.wait_for_load_state("load")
        page.screenshot(path=target, full_page=True)
        browser.close()
    print(target)


if __name__ == "__main__":
    main(*sys.argv[1:])
