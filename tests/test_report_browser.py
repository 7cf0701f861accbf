"""The demo's report opens in headless Chromium (from the OS packages) without errors, every picture decoded."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Runs first in <head>: records script errors and failed loads (capture phase), then, once the page
# has loaded, writes into the DOM how many images there are and how many did not decode.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(e.message || "failed to load a " + e.target.tagName), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({images: images.length, errors: window.__errors,
                                    broken: images.filter(i => !i.complete || i.naturalWidth === 0).length});
  document.body.appendChild(out);
});
</script>"""


def open_in_chromium(page: Path, work: Path) -> dict:
    """``{"images": n, "broken": n, "errors": [...]}`` for ``page`` as headless Chromium loads it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is not installed; install it with `apt-get install -y chromium` "
                    "(Debian/Ubuntu; .ci/run and the README's set-up command do this)")
    text = page.read_text()
    assert "<head>" in text, f"{page} has no <head> to put the probe in"
    probed = work / page.name
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    result = subprocess.run([chromium, *FLAGS, f"--user-data-dir={work / 'profile'}", "--virtual-time-budget=10000",
                             "--dump-dom", probed.resolve().as_uri()],
                            capture_output=True, text=True, timeout=600, check=True)
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"the page never finished loading in Chromium; stderr:\n{result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_the_check_sees_a_broken_picture_and_a_script_error(tmp_path):
    page = tmp_path / "page" / "broken.html"
    page.parent.mkdir()
    page.write_text("<!doctype html><html><head></head><body><img src='data:image/png;base64,AAAA'>"
                    "<script>undefined_function()</script></body></html>")
    seen = open_in_chromium(page, tmp_path)
    assert seen["images"] == 1 and seen["broken"] == 1
    assert any("undefined_function" in e for e in seen["errors"]) and "failed to load a IMG" in seen["errors"]


@pytest.mark.slow
def test_demo_report_opens_with_every_picture(demo_report, tmp_path):
    expected = len(re.findall(r"<img\b", demo_report.read_text()))
    # sink heatmap, FastV scores and kept tokens (debias off / on), RefAM overlay + ground truth per expression
    assert expected >= 1 + 4 + 2 * 4
    assert open_in_chromium(demo_report, tmp_path) == {"images": expected, "errors": [], "broken": 0}
