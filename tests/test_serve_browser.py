"""The search page as a person sees it: `prvr serve` runs as its own process on loopback, and
headless Chromium (Debian's package) loads the page with a query in its address, which the page
submits on load as a typed one. The test reads the rendered DOM (hits and timelines drawn) and a
screenshot (the moments' red bars are on screen).

.ci/run installs Chromium and sets PRVR_BROWSER_TEST=required, so there this test cannot skip;
elsewhere it skips when no Chromium is installed."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlencode

import numpy as np
import pytest

from conftest import REPO, tool_env

pytest.importorskip("fastapi")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("PRVR_BROWSER_TEST") == "required":
        pytest.fail("PRVR_BROWSER_TEST=required but no chromium on PATH (apt-get install chromium)")
    pytest.skip("no chromium on PATH (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(text_search_work):
    port = _free_port()
    env = tool_env(PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "prvr", "serve", "--index", "index", "--encoder", "encoder",
                             "--port", str(port)], cwd=text_search_work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("prvr serve did not come up: " + (proc.stdout.read() if proc.stdout else ""))
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _browser(*args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_the_page_loads_searches_and_draws_the_timelines(server, tmp_path):
    page = server + "/?" + urlencode({"q": "a person opens a door", "mode": "text", "k": 5})
    dom = _browser("--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-searched="5"' in html, html[-3000:]
    assert len(re.findall(r'<li class="hit">', html)) == 5
    bars = re.findall(r'class="moment" style="left: ([\d.]+)%; width: ([\d.]+)%;"', html)
    assert len(bars) == 5, html[-3000:]
    for left, width in bars:
        assert 0 <= float(left) < 100 and 0 < float(width) <= 100 - float(left) + 1e-6
    assert "5 videos for “a person opens a door”" in html

    shot = tmp_path / "page.png"
    out = _browser(f"--screenshot={shot}", "--window-size=1100,900", page)
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(str(shot))[..., :3]
    red = (np.abs(img - np.array([230, 57, 70]) / 255.0).max(axis=-1) < 0.06).sum()   # the moments' colour
    assert red > 50, f"no moment bar visible in {shot}"
    keep = os.environ.get("PRVR_SCREENSHOT_DIR")
    if keep:
        shutil.copy2(shot, os.path.join(keep, "serve_page.png"))


def test_a_bad_query_shows_the_servers_message(server):
    page = server + "/?" + urlencode({"q": "nobody#enc#0", "mode": "query_id", "k": 5})
    html = _browser("--dump-dom", page).stdout
    assert 'id="status" class="error"' in html and "nobody#enc#0" in html
