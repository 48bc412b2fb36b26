"""The explorer used as a person would: JupyterLab on a local port, a notebook that opens
the explorer, driven in headless Chromium (Playwright) at a laptop-sized window.

Needs `playwright` (requirements/ci-browser.txt) and a Chromium binary: Debian's
`chromium` package at /usr/bin/chromium, or $MSIF_CHROMIUM. Skipped without them, unless
MSIF_REQUIRE_BROWSER=1 (CI), which makes their absence a failure. Saves
results/explorer_screenshot.png (or $MSIF_SCREENSHOT_DIR/explorer_screenshot.png).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from helpers_world import build_tiny_shipped, explorer_notebook

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a browser: not in `-m "not slow"`

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MSIF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
VIEWPORT = {"width": 1366, "height": 768}
# kernel start + torch import + factor fitting on a busy 2-core machine
TIMEOUT_MS = int(float(os.environ.get("MSIF_BROWSER_TIMEOUT_S", 240)) * 1000)

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - CI installs it (requirements/ci-browser.txt)
    sync_playwright = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_lab_settings(settings_dir: Path) -> None:
    """User settings of a throwaway profile: no news/update notifications over the page,
    and the notebook's kernel starts without a "Select Kernel" dialog."""
    for ext, name, values in (
        ("apputils-extension", "notification", {"fetchNews": "false", "checkForUpdates": False}),
        ("notebook-extension", "tracker", {"autoStartDefaultKernel": True}),
    ):
        d = settings_dir / "@jupyterlab" / ext
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.jupyterlab-settings").write_text(json.dumps(values))


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a temp dir with the explorer notebook; stopped in all cases."""
    missing = None
    if sync_playwright is None:
        missing = "playwright is not installed: pip install -r requirements/ci-browser.txt"
    elif not Path(CHROMIUM).exists():
        missing = f"no Chromium at {CHROMIUM}: apt-get install chromium (or set MSIF_CHROMIUM)"
    if missing:  # CI sets MSIF_REQUIRE_BROWSER=1 so that a missing install fails loudly
        (pytest.fail if os.environ.get("MSIF_REQUIRE_BROWSER") == "1" else pytest.skip)(missing)
    root = tmp_path / "lab"
    root.mkdir()
    tiny = build_tiny_shipped(tmp_path / "tiny")
    nbformat.write(explorer_notebook(tiny, tmp_path / "cache"), root / "explore.ipynb")
    home = tmp_path / "home"
    _quiet_lab_settings(home / "lab-settings")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{bindir}:{os.environ['PATH']}",
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ipy")}
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [str(bindir / "jupyter"), "lab", "--no-browser", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                url = f"{base}/api/status?token={token}"
                with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - localhost
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (tmp_path / "lab.log").read_text()
                raise RuntimeError(f"JupyterLab did not start:\n{log_text}")
            time.sleep(0.5)
        yield base, token, tmp_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _wait_for_steady_kernel(base: str, token: str, steady_s: float = 4.0) -> None:
    """Wait until the notebook's session has one kernel, idle, unchanged for `steady_s`
    (Lab may replace the first kernel it starts; cells sent meanwhile are lost)."""
    deadline, seen, since = time.monotonic() + 120, None, time.monotonic()
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=10) as r:
            sessions = json.loads(r.read())
        state = [(x["kernel"]["id"], x["kernel"]["execution_state"]) for x in sessions]
        if state != seen:
            seen, since = state, time.monotonic()
        elif len(state) == 1 and state[0][1] == "idle" and time.monotonic() - since > steady_s:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the notebook's kernel never settled: {seen}")


RANKED_DOCS = "els => els.map(e => e.getAttribute('data-doc')).join(',')"
OVERFLOW = """el => {
  const box = el.getBoundingClientRect();
  let worst = 0;
  for (const c of el.querySelectorAll('*')) {
    const r = c.getBoundingClientRect();
    if (r.width > 0 && r.height > 0) worst = Math.max(worst, r.right - box.right);
  }
  return {scroll: el.scrollWidth, client: el.clientWidth, beyond: worst,
          right: box.right, page: document.documentElement.scrollWidth,
          window: window.innerWidth};
}"""


def test_explorer_in_jupyterlab(lab):
    base, token, tmp = lab
    shots = Path(os.environ.get("MSIF_SCREENSHOT_DIR", REPO / "results"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/explore.ipynb?token={token}", timeout=120_000)
            page.locator(".jp-Notebook").first.wait_for()
            page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator"
                         "[data-status='idle']").first.wait_for(timeout=TIMEOUT_MS)  # fmt: skip
            select = page.locator(".jp-Dialog").get_by_role("button", name="Select")
            if select.count():  # a "Select Kernel" dialog despite the setting: accept it
                select.click()
            explorer = page.locator(".msif-explorer").first
            ranked = explorer.locator(".msif-ranked .msif-hit")
            for attempt in range(2):  # Run ▸ Run All Cells, as a person would (again if lost)
                _wait_for_steady_kernel(base, token)
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                try:
                    ranked.first.wait_for(timeout=TIMEOUT_MS // 2)
                    break
                except PlaywrightTimeout:
                    if attempt:
                        raise
            before = ranked.evaluate_all(RANKED_DOCS)
            query = explorer.locator("select").first
            options = query.locator("option").all_inner_texts()
            query.select_option(index=1)
            page.wait_for_function(
                "([sel, old]) => { const els = [...document.querySelectorAll(sel)]; "
                "return els.length && els.map(e => e.getAttribute('data-doc')).join(',') !== old;"
                " }", arg=[".msif-explorer .msif-ranked .msif-hit", before], timeout=TIMEOUT_MS,
            )  # fmt: skip
            after = ranked.evaluate_all(RANKED_DOCS)
            assert after != before and options[1] in explorer.locator("select").first.evaluate(
                "s => s.options[s.selectedIndex].text")
            tokens = explorer.locator(".msif-tok")
            expect(tokens.first).to_be_visible()
            assert tokens.count() > 20
            colours = tokens.evaluate_all(
                "els => els.map(e => getComputedStyle(e).backgroundColor)")
            assert any(c.startswith("rgba(214, 39, 40") for c in colours)  # red: helps
            explorer.locator(".msif-layers").first.wait_for()
            explorer.scroll_into_view_if_needed()
            geo = explorer.evaluate(OVERFLOW)
            assert geo["scroll"] <= geo["client"], geo
            assert geo["beyond"] <= 1, geo
            assert geo["page"] <= geo["window"], geo
            page.evaluate("document.querySelector('.msif-explorer').scrollIntoView()")
            page.screenshot(path=str(shots / "explorer_screenshot.png"))
            explorer.screenshot(path=str(tmp / "explorer_element.png"))
        except Exception:
            page.screenshot(path=str(tmp / "failure.png"))
            print(f"screenshot of the failure: {tmp / 'failure.png'}; server log: "
                  f"{tmp / 'lab.log'}")
            raise
        finally:
            browser.close()
