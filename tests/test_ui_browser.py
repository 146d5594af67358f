"""`lmforge ui` in a real browser: headless Chromium (Selenium) opens the MLflow UI over a root holding a real
tiny training run, finds the run on the experiment's page, opens it, finds its loss chart and its
registered model. Screenshots go to the test's temp dir.

MLflow's UI is a React app that renders after the page loads, so every lookup waits for its element."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import free_port, wait_serving

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 90  # a loaded 2-core machine renders MLflow's UI slowly; a present element is found at once


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A root with one finished experiment=smoke run, its final model registered."""
    import ray

    from orchestrator.config import load_config
    from orchestrator.launcher import train

    root = tmp_path_factory.mktemp("ui_root")
    overrides = ["experiment=smoke", "trainer.max_steps=10", "run_name=browser-run", f"paths.root={root}"]
    cfg = load_config(overrides)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        result = train(cfg, overrides)
    finally:
        ray.shutdown()
    return root, result, register(cfg, result)


def register(cfg, result) -> str:
    """The run's registered model name: registered by `lmforge train` itself, else here with the same call."""
    from mlflow import MlflowClient

    from orchestrator.registry import register_final_model
    from orchestrator.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg.tracking, cfg.paths.root))
    found = client.search_model_versions(f"run_id='{result.mlflow_run_id}'")
    if not found:
        record = register_final_model(cfg, result.mlflow_run_id, result.run_dir, result.checkpoint, result.metrics)
        assert record is not None and record.version is not None, "the final model was not registered"
        found = client.search_model_versions(f"run_id='{result.mlflow_run_id}'")
    return found[0].name


@pytest.fixture(scope="module")
def ui(trained):
    """`lmforge ui paths.root=<root> --port <free>`, as a user starts it."""
    root = trained[0]
    port = free_port()
    log = root / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", f"paths.root={root}", "--port",
                                 str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # Generous: on a loaded 2-core machine the server's start alone has taken over two minutes.
        assert wait_serving(url, proc, 300), f"lmforge ui never answered:\n{log.read_text()[-3000:]}"
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"headless Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}); `make setup` installs the "
                    "Debian packages chromium and chromium-driver where it may use apt-get")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, xpath: str, what: str, clickable: bool = False):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    locator = (By.XPATH, xpath)
    condition = ec.element_to_be_clickable(locator) if clickable else ec.visibility_of_element_located(locator)
    return WebDriverWait(driver, WAIT_S).until(condition, message=f"{what} never appeared on {driver.current_url}")


def wait_for_text(driver, text: str, clickable: bool = False):
    """The first element whose own text is `text` (a link, a tab, a cell), once React has drawn it."""
    return wait_for(driver, f"//*[normalize-space(text())='{text}']", repr(text), clickable)


def test_ui_shows_the_run_its_loss_chart_and_its_registered_model(trained, ui, browser, tmp_path):
    root, result, model_name = trained
    shots = tmp_path / "screenshots"
    shots.mkdir()

    browser.get(f"{ui}/#/experiments")
    # MLflow 3.17 shows every experiment in the view of the browser's GenAI / Model training switch (saved in
    # the browser; GenAI at first), whatever the experiment's kind: a first visit turns it to Model training.
    wait_for_text(browser, "Model training", clickable=True).click()
    wait_for_text(browser, "lmforge", clickable=True).click()
    wait_for_text(browser, result.run_name, clickable=True)  # the experiment's runs, listed by name
    browser.save_screenshot(str(shots / "experiment.png"))
    wait_for_text(browser, result.run_name, clickable=True).click()

    wait_for_text(browser, "Model metrics", clickable=True).click()
    search = wait_for(browser, "//input[@placeholder='Search metric charts']", "the chart search box", True)
    search.send_keys("train/loss")
    wait_for(browser, f"//*[contains(text(), '{result.run_name} (train/loss)')]", "the loss chart's legend")
    wait_for(browser, "//*[name()='path' and contains(@class, 'js-line')]", "the loss curve")  # Plotly's line
    browser.save_screenshot(str(shots / "run-metrics.png"))

    wait_for_text(browser, "Overview", clickable=True).click()
    # "Registered models" on the run's overview links the version this run produced.
    version_link = f"//a[contains(@href, '/models/{model_name}/versions/1')]"
    wait_for(browser, version_link, f"the registered model {model_name}", clickable=True)
    browser.save_screenshot(str(shots / "run-overview.png"))
    wait_for(browser, version_link, f"the registered model {model_name}", clickable=True).click()
    wait_for(browser, "//*[contains(text(), 'Version 1')]", "the model version's page")
    browser.save_screenshot(str(shots / "model.png"))
    assert all((shots / name).stat().st_size > 10_000 for name in
               ("experiment.png", "run-metrics.png", "run-overview.png", "model.png"))
