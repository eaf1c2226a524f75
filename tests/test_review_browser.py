"""The review page in a real browser (Debian's headless Chromium driven by Selenium) against a real caption worker,
a real training worker and Redis: follow a job, filter to its errors, correct captions in place and in the item
view, accept, reject, caption again, export the reviewed items and fine-tune on them through the queue.

With CAPTIONER_SCREENSHOTS=<folder> it also writes PNGs of the job page and the item view (docs/ keeps them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.messages import item_id
from common.store import ModelStore
from producer.jobs import JobClient
from producer.local import WorkerProcess, free_port
from tests.conftest import MAX_LENGTH

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 120  # a deadline for failing, never a pace: every wait below polls for a state
HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
TRAIN_OPTIONS = (
    "batch_size=2 grad_accum=1 eval_steps=2 save_steps=2 lr_scheduler=constant learning_rate=0.003 "
    f"max_length={MAX_LENGTH} eval_max_samples=2 epochs=100"
)


class ReviewProcess:
    """`captioner review` as a user starts it, on a free loopback port; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "cli.main", "review", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"review server not up:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    assert not missing, f"{missing} not installed: apt-get install chromium chromium-driver (make system-tools)"
    profile = tempfile.mkdtemp(prefix="captioner-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,800",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _screenshot(driver, path: Path) -> None:
    """A PNG of the window, reduced to 256 colours so the copies kept in docs/ stay small."""
    from PIL import Image

    driver.save_screenshot(str(path))
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def _job(client: JobClient, root: Path, tmp_path: Path) -> tuple[str, dict[str, str], dict[str, str]]:
    """Six shape images, a corrupt file and an image outside the allowed roots, captioned by the real worker:
    (job id, {file name: item id}, {item id: the image's true caption, what a reviewer would write})."""
    from training.synthetic import make_shapes

    folder = root / f"review-{os.urandom(3).hex()}"
    shapes = make_shapes(folder, 6, seed=11, size=32)
    truth = {item_id(str(p)): text for p, text in shapes}
    refs = [str(p) for p, _ in shapes]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(refs[0], tmp_path / "outside.png")
    refs += [str(folder / "broken.png"), str(tmp_path / "outside.png")]
    report = client.enqueue(refs, job_id="job-browser", name="review in a browser")
    info = client.wait(report.job_id, timeout=WAIT_S, on_tick=lambda _: None)
    assert (info.ok, info.error) == (6, 2)
    return report.job_id, {Path(r).name: item_id(r) for r in refs}, truth


def test_review_correct_export_and_fine_tune_in_a_browser(
    caption_worker,
    worker_env: dict[str, str],
    session_root: Path,
    tiny_model: Path,
    client: JobClient,
    tmp_path: Path,
    browser,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    store = tmp_path / "store"
    exports = session_root / f"exports-{os.urandom(3).hex()}"  # under the allowed roots: training workers read it
    env = {
        **worker_env,
        "CAPTIONER_MODEL_STORE": str(store),
        "CAPTIONER_REVIEW_EXPORT_DIR": str(exports),
        "CAPTIONER_REVIEW_REVIEWER": "tester",
    }
    trainer = WorkerProcess(env, training=True, log=tmp_path / "train.log").start()  # loads while we caption
    job_id, ids, truth = _job(client, session_root, tmp_path)
    server = ReviewProcess(env, tmp_path / "review.log")
    driver = browser
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
    shots = os.environ.get("CAPTIONER_SCREENSHOTS")
    try:
        server.wait_ready()
        # 1. The jobs list: live progress over server-sent events, and the caption worker with its model version.
        driver.get(server.url + "/")
        row = f'tr[data-job="{job_id}"]'
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{row} .done").text == "8/8")
        assert driver.find_element(By.CSS_SELECTOR, f"{row} .state").text == "done"
        wait.until(lambda d: caption_worker.name in d.find_element(By.ID, "caption-workers").text)
        assert "tiny-git@" in driver.find_element(By.ID, "caption-workers").text
        queues = driver.find_element(By.ID, "queues").text
        assert f"{worker_env['CAPTIONER_CAPTION_QUEUE']}: 0 waiting" in queues
        # 2. The job, filtered to its errors: both failures with their error class and message.
        driver.find_element(By.CSS_SELECTOR, f'{row} a[href="/jobs/{job_id}"]').click()
        Select(wait.until(lambda d: d.find_element(By.NAME, "status"))).select_by_visible_text("error")
        driver.find_element(By.CSS_SELECTOR, ".filters button[type=submit]").click()
        wait.until(lambda d: "status=error" in d.current_url)
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        classes = sorted(c.find_element(By.CSS_SELECTOR, ".error-class").text for c in cards)
        assert classes == ["decode_error", "forbidden"]
        # 3. Every captioned item, then keyboard only: edit in place, accept, reject.
        driver.get(f"{server.url}/jobs/{job_id}?status=ok")
        order = [c.get_attribute("data-item") for c in driver.find_elements(By.CSS_SELECTOR, ".card")]
        assert sorted(order) == sorted(i for name, i in ids.items() if name not in ("broken.png", "outside.png"))
        focused = driver.switch_to.active_element
        assert focused.get_attribute("data-item") == order[0]
        focused.send_keys("e")
        box = driver.switch_to.active_element
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(truth[order[0]], Keys.ENTER)
        first = f'.card[data-item="{order[0]}"]'
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{first} .corrected").text == truth[order[0]])
        driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
        driver.switch_to.active_element.send_keys("a")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'.card[data-item="{order[1]}"] .mark').text == "accepted")
        driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT, "e")
        box = driver.switch_to.active_element
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(HOSTILE, Keys.ENTER)
        third = f'.card[data-item="{order[2]}"]'
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{third} .corrected").text == HOSTILE)
        driver.switch_to.active_element.send_keys("r")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{third} .mark").text == "rejected")
        assert driver.title != "pwned" and not driver.find_elements(
            By.CSS_SELECTOR, ".card .corrected img, script:not([src])"
        )
        # 4. Open an item with the keyboard, correct it in the item view, reload: the correction is kept.
        driver.find_element(By.CSS_SELECTOR, f'.card[data-item="{order[3]}"]').send_keys(Keys.ENTER)
        wait.until(lambda d: f"/items/{order[3]}" in d.current_url)
        model_caption = driver.find_element(By.CSS_SELECTOR, ".card .caption").text
        box = driver.find_element(By.ID, "correction")
        box.clear()
        box.send_keys(truth[order[3]], Keys.CONTROL, Keys.ENTER)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card .corrected").text == truth[order[3]])
        driver.refresh()
        kept = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card .corrected"))
        assert kept.text == truth[order[3]]
        assert driver.find_element(By.CSS_SELECTOR, ".card .caption").text == model_caption  # never overwritten
        assert "tester" in driver.find_element(By.CSS_SELECTOR, ".card .reviewed").text
        if shots:
            driver.execute_script("window.scrollTo(0, 0)")
            _screenshot(driver, Path(shots) / "review-item.png")
        driver.find_element(By.ID, "back").click()
        wait.until(lambda d: d.current_url == f"{server.url}/jobs/{job_id}?status=ok")  # back to the same filter
        # 5. Caption a selection again with other parameters: it goes through the queue as a retry.
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'.card[data-item="{order[4]}"]'))
        driver.find_element(By.CSS_SELECTOR, f'.card[data-item="{order[4]}"]').send_keys("x")
        driver.find_element(By.ID, "again-max-length").send_keys("5")
        driver.find_element(By.CSS_SELECTOR, '[data-act="again"]').click()
        wait.until(lambda d: "1 item(s) sent to be captioned again" in d.find_element(By.ID, "flash").text)
        wait.until(lambda d: (client.ledger.item(job_id, order[4]) or {}).get("params", {}).get("max_length") == 5)
        if shots:
            driver.refresh()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card .corrected"))
            _screenshot(driver, Path(shots) / "review-job.png")
        # 6. Export the reviewed items: the corrected text, the accepted caption, nothing rejected.
        driver.find_element(By.CSS_SELECTOR, '[data-act="export"]').click()
        result = wait.until(lambda d: d.find_element(By.ID, "export-result").text)
        assert result.startswith("3 reviewed item(s) written to ")
        folder = Path(result.removeprefix("3 reviewed item(s) written to ").removesuffix("/metadata.jsonl"))
        lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        texts = sorted(line["text"] for line in lines)
        accepted = client.ledger.item(job_id, order[1])["caption"]
        assert texts == sorted([truth[order[0]], accepted, truth[order[3]]])
        # 7. Fine-tune on them through the queue, from the page, on the real training worker.
        trainer.wait_ready()
        form = driver.find_element(By.ID, "train-form")
        for name, value in (("base_model", str(tiny_model)), ("max_steps", "2"), ("options", TRAIN_OPTIONS)):
            field = form.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        link = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#train-result a"))
        train_job = link.text
        link.click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".job-head .state").text in ("done", "failed"))
        assert driver.find_element(By.CSS_SELECTOR, ".job-head .state").text == "done", trainer.log_tail()
        versions = [v for v in ModelStore(store).list() if v.meta.get("job_id") == train_job]
        assert len(versions) == 1 and versions[0].meta["steps"] == 2
        trained_on = Path(versions[0].meta["dataset"]) / "metadata.jsonl"
        assert sorted(json.loads(line)["text"] for line in trained_on.read_text().splitlines()) == texts
        driver.get(server.url + "/models")
        assert versions[0].version in driver.find_element(By.TAG_NAME, "main").text
    finally:
        server.stop()
        trainer.terminate()
