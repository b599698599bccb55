"""Render a report in headless Chromium (Debian's ``chromium``): check every figure loaded, take a
screenshot. Used by the browser test and to refresh ``docs/report.png``::

    python -m dynaprune.report.browser report/report.html docs/report.png
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dynaprune.errors import DynapruneError

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")
# After the load event: how many <img> decoded (naturalWidth > 0), written into the DOM for --dump-dom.
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  const out = document.createElement('pre');
  out.id = 'figure-check';
  out.textContent = 'loaded=' + ok.length + ' total=' + imgs.length;
  document.body.appendChild(out);
});
</script>"""
_RESULT = re.compile(r"<pre id=\"figure-check\">loaded=(\d+) total=(\d+)</pre>")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _run(args: list[str], timeout: int) -> str:
    binary = find_chromium()
    if binary is None:
        raise DynapruneError("chromium not found (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="dynaprune-chromium-") as profile:
        proc = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise DynapruneError(f"chromium failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def figures_loaded(html_path: Path, timeout: int = 120) -> tuple[int, int]:
    """(images that loaded, images in the page) once the page's load event has fired."""
    text = Path(html_path).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="dynaprune-check-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>", 1) if "</body>" in text
                        else text + CHECK_SCRIPT, encoding="utf-8")
        dom = _run(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], timeout)
    match = _RESULT.search(dom)
    if match is None:
        raise DynapruneError("the page never finished loading in chromium (no load event)")
    return int(match.group(1)), int(match.group(2))


WIDTH_SCRIPT = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'width-check';
  const root = document.documentElement;
  out.textContent = 'scroll=' + root.scrollWidth + ' client=' + root.clientWidth;
  document.body.appendChild(out);
});
</script>"""
_WIDTH = re.compile(r"<pre id=\"width-check\">scroll=(\d+) client=(\d+)</pre>")


def page_widths(html_path: Path, width: int = 1400, timeout: int = 120) -> tuple[int, int]:
    """(the page's scroll width, the window's width) in a ``width``-px window: the page overflows
    horizontally when the first is larger."""
    text = Path(html_path).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="dynaprune-check-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(text.replace("</body>", WIDTH_SCRIPT + "</body>", 1), encoding="utf-8")
        dom = _run([f"--window-size={width},900", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                   timeout)
    match = _WIDTH.search(dom)
    if match is None:
        raise DynapruneError("the page never finished loading in chromium (no load event)")
    return int(match.group(1)), int(match.group(2))


def screenshot(html_path: Path, png_path: Path, width: int = 1280, height: int = 2400, timeout: int = 120) -> Path:
    """A PNG of the top ``width`` x ``height`` pixels of the rendered page."""
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={png_path}",
          Path(html_path).resolve().as_uri()], timeout)
    if not png_path.is_file():
        raise DynapruneError(f"chromium wrote no screenshot at {png_path}")
    return png_path


if __name__ == "__main__":
    html, png = Path(sys.argv[1]), Path(sys.argv[2])
    loaded, total = figures_loaded(html)
    print(f"{loaded}/{total} figures loaded; screenshot: {screenshot(html, png)}")
