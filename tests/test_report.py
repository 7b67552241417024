"""report.html and report.md: self-contained, every image an inline PNG that decodes, every table present.

When a headless Chromium is installed (Debian's `chromium-headless-shell` or `chromium`), the page is also
opened in it: every image must load and every table render. Without one that test skips locally and fails
under CI=true (`make test` installs the browser); the structural checks always run.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest
from needs import tool_missing
from test_compare import runs, specs  # noqa: F401  (the fixture and its run folders)

from lmforge.report.compare import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("report") / "report"
    comparison = compare(specs(runs), baseline="base", out=out, title="test <report>")
    return out, comparison


def test_html_is_self_contained_with_valid_inline_pngs(report):
    import matplotlib.image

    out, comparison = report
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == len(re.findall(r"<img", page)) == 4  # scores, size, cost, curves
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        png = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC)
        height, width = matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2]
        assert width > 300 and height > 200
    assert page.count("<table>") == len(comparison.tables) == 4
    assert "test &lt;report&gt;" in page  # cells and titles are escaped
    assert not re.search(r'(src|href)="(https?:|//)', page)  # nothing is fetched when it opens
    assert 'class="bad">did not pay off' in page and 'class="good">paid off' in page


def test_markdown_tables_and_plot_files(report):
    out, comparison = report
    markdown = (out / "report.md").read_text()
    for table in comparison.tables:
        assert f"### {table.title}" in markdown
    for name in ("scores", "quality_vs_size", "quality_vs_cost", "training_curves"):
        assert f"](plots/{name}.png)" in markdown
        assert (out / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")
CHECK = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const tables = document.querySelectorAll("table").length;
  document.title = `images=${document.images.length} broken=${broken} tables=${tables}`;
});
</script></body>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        tool_missing("no headless Chromium installed (apt-get install chromium-headless-shell)")
    out, _ = report
    probe = tmp_path / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", CHECK))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "<title>images=4 broken=0 tables=4</title>" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2400", (out / "report.html").as_uri()],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert shot.read_bytes().startswith(PNG_MAGIC)
