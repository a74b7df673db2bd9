"""The job page in a real browser: headless Chromium loads the page of a
running job whose task was killed, and the test reads what it shows (the
name, a rate above zero, rows of the checkpoint table, the recovery, charts
with data) and looks at the screenshot for the drawn lines."""

import html.parser
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from sluiceway.jobs import run
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import TaskKiller
from sluiceway.jobs.ui.server import Sources, make_server, serve_in_thread, url

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page(html.parser.HTMLParser):
    """The parts of the rendered DOM the test reads: element text by id,
    the summary cards, table rows, and the charts' data-points."""

    def __init__(self):
        super().__init__()
        self.text: dict[str, str] = {}
        self.cards: dict[str, str] = {}
        self.rows: dict[str, int] = {}
        self.points: dict[str, int] = {}
        self._stack: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("br", "img", "link", "meta", "input"):
            return
        self._stack.append((tag, attrs))
        if "data-points" in attrs:
            self.points[attrs["id"]] = int(attrs["data-points"])
        if tag == "tr":
            table = next((a.get("id") for t, a in reversed(self._stack) if t == "table" and a.get("id")), None)
            if table and any(t == "tbody" for t, _ in self._stack):
                self.rows[table] = self.rows.get(table, 0) + 1

    def handle_endtag(self, tag):
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        for tag, attrs in reversed(self._stack):
            if "id" in attrs:
                self.text[attrs["id"]] = self.text.get(attrs["id"], "") + data
                break
        card = next((a["data-label"] for _, a in reversed(self._stack) if "data-label" in a), None)
        if card and self._stack[-1][1].get("class") == "value":
            self.cards[card] = data


def browse(page_url: str, work: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         f"--user-data-dir={work}/chromium-profile", "--window-size=1300,1400", "--virtual-time-budget=5000",
         *args, page_url],
        capture_output=True, text=True, timeout=90)


def test_the_job_page_of_a_running_job_in_chromium(tmp_path):
    assert CHROMIUM, "chromium is missing: `make test` installs it (apt-get install chromium)"
    root = str(tmp_path / "ckpt")
    server = make_server(Sources([root]), "127.0.0.1", 0)
    serve_in_thread(server)
    base = url(server)
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=16_000, rows_per_second=2000)
    killer = TaskKiller("by_user[1]", after_epoch=3)
    done = {}
    job = threading.Thread(target=lambda: done.update(summary=run(flow, root, trigger_s=0.5, checkpoint_every=2,
                                                                  on_event=killer, parallelism=2)))
    job.start()
    try:
        deadline = time.time() + 60
        while True:  # until the job has recovered and run a few epochs since
            try:
                with urllib.request.urlopen(base + "/api/jobs/clicks", timeout=10) as r:
                    view = json.loads(r.read())
            except urllib.error.HTTPError as exc:  # 404 until the job's folder is written
                assert exc.code == 404, exc
                view = None
            if isinstance(view, dict) and view["recoveries"] and len(view["epochs"]) >= 4 and \
                    view["epochs"][-1]["at"] > view["recoveries"][0]["at"] + 1:
                break
            assert time.time() < deadline and job.is_alive(), "the job ended before the page could be read"
            time.sleep(0.5)
        page_url = f"{base}/jobs/clicks"
        dom = browse(page_url, str(tmp_path), "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = tmp_path / "job-page.png"
        taken = browse(page_url, str(tmp_path), f"--screenshot={shot}")
        assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    finally:
        job.join(timeout=120)
        server.shutdown()
        server.server_close()
    assert done["summary"]["restarts"] == 1

    page = Page()
    page.feed(dom.stdout)
    assert page.text.get("name") == "clicks"
    assert float(page.cards["input rows/s"].replace(",", "")) > 0
    assert page.cards["restarts"] == "1"
    assert page.rows.get("checkpoints", 0) >= 1 and page.rows.get("recoveries") == 1
    assert "died: its executor x" in dom.stdout
    assert page.points["chart-rows"] >= 4 and page.points["chart-ckpt-duration"] >= 1
    assert page.points["chart-lag"] >= 4 and page.rows.get("sources") == 1  # the job's one source, and its lag
    assert not page.text.get("error", "").strip()

    from PIL import Image

    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    drawn = {name: sum(n for n, c in colors if all(abs(a - b) <= 40 for a, b in zip(c, rgb)))
             for name, rgb in (("rows in (blue)", (0x0B, 0x62, 0xC4)), ("recovery marker (red)", (0xD9, 0x2D, 0x20)))}
    assert all(n > 200 for n in drawn.values()), drawn  # lines were drawn, not only axes
