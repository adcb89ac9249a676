"""The operator's page in a real browser (Debian's chromium, driven by Playwright) against running profiles.

One `toposerve up` per profile for the whole module (asynchronous for the checks;
horizontal_microservice and prediction_cache for their screenshots), started together.
Screenshots go to a temporary directory (and to ``TOPOSERVE_UI_SCREENSHOTS`` when set,
which is how docs/ui/ was made).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest

from tests.support.processes import REPO, RunningProfile
from toposerve.brokers import (
    REASON_HEADER,
    BatchManifest,
    BatchStore,
    connect_redis,
    dead_exchange_name,
    encode_chunk_result,
    new_batch_id,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
HOW_TO_GET_IT = ("the /ui browser tests need Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; "
                 "deploy/setup.sh installs it when run as root) and Playwright from PyPI (pip install -e '.[test]'); "
                 "never `playwright install`")
PROFILES = ("asynchronous", "horizontal_microservice", "prediction_cache", "model_versions")
SAMPLE_DIGIT = REPO / "deploy" / "samples" / "digits" / "digit_3_64x64_rgb.png"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def playwright_browser():
    if not CHROMIUM.exists():
        pytest.skip(HOW_TO_GET_IT)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(HOW_TO_GET_IT)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def profiles(amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Every profile of PROFILES running, each in a namespace of its own (started together, then awaited)."""
    logs = tmp_path_factory.mktemp("ui-profiles")
    running = {}
    try:
        for name in PROFILES:
            env = {"TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_REDIS_URL": redis_url,
                   "TOPOSERVE_NAMESPACE": f"ui-{secrets.token_hex(3)}", "TOPOSERVE_UI_POLL_MS": "500"}
            running[name] = (RunningProfile(name, env, logs / f"{name}.log"), env)
        for profile, _ in running.values():
            profile.wait_ready(timeout=120)
        yield {name: profile for name, (profile, _) in running.items()} | {"env": {n: e for n, (_, e) in
                                                                                 running.items()}}
    finally:
        for profile, _ in running.values():
            profile.stop()


@pytest.fixture
def page(playwright_browser):
    context = playwright_browser.new_context(viewport={"width": 1150, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"the page's script failed: {errors}"


def screenshot(page, name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.getbasetemp() / "ui-screenshots"
    directory.mkdir(exist_ok=True)
    target = directory / f"{name}.png"
    page.locator("#topology").screenshot(path=str(target))
    extra = os.environ.get("TOPOSERVE_UI_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        page.locator("#topology").screenshot(path=str(Path(extra) / f"{name}.png"))
    assert target.stat().st_size > 5000  # an image of the graph, not an empty box
    return target


class Load:
    """Requests at a steady pace from a thread while the page is watched."""

    def __init__(self, base_url: str, model: str = "iris") -> None:
        self.base_url, self.model = base_url, model
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self.stop.is_set():
                client.post(f"/v1/models/{self.model}/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
                self.sent += 1
                time.sleep(0.02)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def figure(page, stage: str, name: str) -> str:
    return page.locator(f'#stage-table tr[data-stage="{stage}"] td[data-figure="{name}"]').inner_text()


def test_the_graph_shows_every_queue_and_its_numbers_move_under_load(profiles, page, tmp_path_factory) -> None:
    from toposerve.deploy.profile import load_profile

    running = profiles["asynchronous"]
    namespace = profiles["env"]["asynchronous"]["TOPOSERVE_NAMESPACE"]
    page.goto(f"{running.base_url}/ui")
    for spec in load_profile("asynchronous").queue_specs(namespace):
        page.wait_for_selector(f'g[data-node="queue:{spec.name}"]', timeout=WAIT_MS)
    page.wait_for_selector('#stage-table tr[data-stage="predict"]', timeout=WAIT_MS)
    before = figure(page, "predict", "out")
    with Load(running.base_url) as load:
        page.wait_for_function(
            """() => { const cell = document.querySelector('#stage-table tr[data-stage="predict"] td[data-figure="out"]');
                       return cell && Number(cell.textContent) > 0; }""", timeout=WAIT_MS)
        moving = figure(page, "predict", "out")
        page.wait_for_function(
            """() => { const cell = document.querySelector('#stage-table tr[data-stage="predict"] td[data-figure="p50"]');
                       return cell && cell.textContent !== '–'; }""", timeout=WAIT_MS)
        assert load.sent > 0
        screenshot(page, "asynchronous", tmp_path_factory)
    assert before in ("0", "–") and float(moving) > 0


@pytest.mark.parametrize("name", ["horizontal_microservice", "prediction_cache"])
def test_other_profiles_are_drawn_with_their_own_nodes(profiles, page, tmp_path_factory, name: str) -> None:
    running = profiles[name]
    own = {"horizontal_microservice": "stage:aggregate", "prediction_cache": "store:prediction cache"}[name]
    model = {"horizontal_microservice": "iris_species", "prediction_cache": "iris"}[name]
    page.goto(f"{running.base_url}/ui")
    page.wait_for_selector(f'g[data-node="{own}"]', timeout=WAIT_MS)
    with Load(running.base_url, model):
        page.wait_for_function(
            """() => [...document.querySelectorAll('#stage-table td[data-figure="out"]')]
                     .some(cell => Number(cell.textContent) > 0)""", timeout=WAIT_MS)
        if name == "prediction_cache":  # the same rows again and again: the cache answers
            page.wait_for_function(
                """() => document.querySelector('g[data-node="store:prediction cache"]').textContent.includes('%')""",
                timeout=WAIT_MS)
        screenshot(page, name, tmp_path_factory)


def _publish_dead_letter(amqp_url: str, namespace: str, job_id: uuid.UUID) -> None:
    """A valid request that died (as when its stage was broken): straight into {ns}.dead with a reason."""
    async def publish() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(dead_exchange_name(namespace))
            body = json.dumps({"id": str(job_id), "model": "iris", "instances": [[6.7, 3.0, 5.2, 2.3]]}).encode()
            await exchange.publish(aio_pika.Message(body, headers={REASON_HEADER: "test: the stage was broken"},
                                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT), "request.iris")

    # Playwright's sync API keeps an event loop running in this thread: publish from another.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, publish()).result(timeout=30)


def test_the_dead_letter_view_replays_a_message_that_then_succeeds(profiles, page, amqp_url: str) -> None:
    running = profiles["asynchronous"]
    namespace = profiles["env"]["asynchronous"]["TOPOSERVE_NAMESPACE"]
    job_id = uuid.uuid4()
    _publish_dead_letter(amqp_url, namespace, job_id)
    page.goto(f"{running.base_url}/ui#dead-letters")
    page.click("#dead-refresh")
    row = page.locator(f'#dead-table tr[data-dead="{job_id}"]')
    row.wait_for(timeout=WAIT_MS)
    assert "the stage was broken" in row.inner_text() and "request.iris" in row.inner_text()
    row.locator('button[data-action="replay"]').click()
    page.wait_for_function(f"""() => document.getElementById('dead-result').textContent.includes('replayed {job_id}')""",
                           timeout=WAIT_MS)
    job = httpx.get(f"{running.base_url}/v1/jobs/{job_id}", params={"wait": 10}, timeout=15)
    assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
    assert job.json()["predictions"][0]["label"] == "virginica"
    # The job view shows it with its path through the stages.
    page.fill("#job-id", str(job_id))
    page.click("#job-form button")
    page.wait_for_selector('#job-result [data-hop="predict"]', timeout=WAIT_MS)
    assert "succeeded" in page.inner_text("#job-result")
    # Gone from the list once replayed.
    page.click("#dead-refresh")
    page.wait_for_function(f"""() => !document.querySelector('#dead-table tr[data-dead="{job_id}"]')""",
                           timeout=WAIT_MS)


def test_the_try_it_form_returns_the_label_of_a_sample_digit(profiles, page) -> None:
    page.goto(f"{profiles['asynchronous'].base_url}/ui#try-it")
    page.wait_for_selector('#try-model option[value="digits_fast"]', state="attached", timeout=WAIT_MS)
    page.select_option("#try-model", "digits_fast")
    page.set_input_files("#try-image", str(SAMPLE_DIGIT))
    page.click("#try-form button")
    answer = page.locator('#try-result [data-answer="labels"]')
    answer.wait_for(timeout=WAIT_MS)
    assert answer.inner_text() == "labels: 3"  # the file name's second token is the true label
    assert page.locator('#try-result [data-hop="preprocess"]').count() == 1


def test_rows_that_are_not_json_are_refused_by_the_form_and_a_wrong_shape_by_the_api(profiles, page) -> None:
    page.goto(f"{profiles['asynchronous'].base_url}/ui#try-it")
    page.wait_for_selector('#try-model option[value="iris"]', state="attached", timeout=WAIT_MS)
    page.fill("#try-rows", "[[5.1, 3.5")
    page.click("#try-form button")
    page.wait_for_function("() => document.getElementById('try-result').textContent.includes('not valid JSON')",
                           timeout=WAIT_MS)
    page.fill("#try-rows", "[[1, 2]]")
    page.click("#try-form button")
    page.wait_for_function("() => /^4\\d\\d /.test(document.getElementById('try-result').textContent)",
                           timeout=WAIT_MS)


def _stage_pids(up_pid: int, stage: str) -> list[int]:
    """The `toposerve worker --stage STAGE` children of a `toposerve up` process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == up_pid and b"worker" in argv and stage.encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.mark.fault
def test_a_killed_stage_shows_as_down_within_seconds(profiles, page) -> None:
    running = profiles["asynchronous"]
    page.goto(f"{running.base_url}/ui")
    page.wait_for_selector('#stage-table tr[data-stage="predict"]', timeout=WAIT_MS)
    assert "down" not in page.locator('g[data-node="stage:predict"]').get_attribute("class").split()
    pids = _stage_pids(running.process.pid, "predict")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    page.wait_for_function(
        """() => document.querySelector('g[data-node="stage:predict"]').classList.contains('down')""", timeout=WAIT_MS)
    assert time.monotonic() - killed < WAIT_MS / 1000
    assert "DOWN" in page.locator('g[data-node="stage:predict"]').text_content()
    assert "no_consumer" in figure(page, "predict", "flags")


def test_the_versions_panel_shows_the_canary_and_the_shadows_agreement(profiles, page) -> None:
    running = profiles["model_versions"]
    image = base64.b64encode(SAMPLE_DIGIT.read_bytes()).decode()
    for _ in range(3):  # jobs the shadow stage compares (the same digit: both versions say 3)
        answer = httpx.post(f"{running.base_url}/v1/models/digits_fast/predict", json={"image": image}, timeout=10)
        assert answer.status_code == 202, answer.text
        job = httpx.get(f"{running.base_url}/v1/jobs/{answer.json()['id']}", params={"wait": 10}, timeout=15)
        assert job.json()["status"] == "succeeded", job.text
    page.goto(f"{running.base_url}/ui#versions")
    iris = page.locator('#versions-table tr[data-model="iris"]')
    iris.wait_for(timeout=WAIT_MS)
    assert [c.inner_text() for c in iris.locator("td").all()][:4] == ["iris", "v2", "v3 · 10 %", "–"]
    page.wait_for_function(
        """() => { const row = document.querySelector('#versions-table tr[data-model="digits_fast"]');
                   return row && Number(row.children[4].textContent) >= 3; }""", timeout=WAIT_MS)
    cells = [c.inner_text() for c in page.locator('#versions-table tr[data-model="digits_fast"] td').all()]
    report = httpx.get(f"{running.base_url}/v1/models/digits_fast/shadow", timeout=10).json()
    assert cells[1] == "v1" and cells[3] == "v2" and report["jobs"] >= 3
    assert float(cells[5].removesuffix(" %")) == pytest.approx(report["agreement_rate"] * 100, abs=0.05)
    # A profile without versions says so instead of an empty table.
    page.goto(f"{profiles['asynchronous'].base_url}/ui#versions")
    page.wait_for_function(
        "() => document.getElementById('versions-status').textContent.includes('no model of this profile')",
        timeout=WAIT_MS)


def _record_running_batch(redis_url: str, namespace: str) -> str:
    """A batch with one of three chunks done, recorded as the submitter and the store stage would."""
    async def record() -> str:
        store = BatchStore(connect_redis(redis_url), namespace, 600)
        try:
            manifest = BatchManifest(id=new_batch_id(), model="iris", total=30, chunks=3, chunk_rows=10,
                                     created=time.time())
            await store.create(manifest)
            await store.complete_chunk(manifest.id, 0, encode_chunk_result("1", [0] * 10, [[1.0, 0, 0]] * 10), 10, 0)
            return manifest.id
        finally:
            await store.client.aclose()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, record()).result(timeout=30)


def test_the_batches_panel_shows_progress_and_cancels(profiles, page, redis_url: str) -> None:
    running = profiles["asynchronous"]
    batch_id = _record_running_batch(redis_url, profiles["env"]["asynchronous"]["TOPOSERVE_NAMESPACE"])
    page.goto(f"{running.base_url}/ui#batches")
    row = page.locator(f'#batch-table tr[data-batch="{batch_id}"]')
    row.wait_for(timeout=WAIT_MS)
    assert row.get_attribute("data-state") == "running" and "10 done" in row.inner_text()
    assert row.locator("progress").get_attribute("value") == "10" and row.locator("progress").get_attribute("max") == "30"
    row.locator('button[data-action="cancel"]').click()
    page.wait_for_function(f"""() => document.getElementById('batch-result').dataset.lastAction === 'cancel:{batch_id}:200'""",
                           timeout=WAIT_MS)
    page.wait_for_selector(f'#batch-table tr[data-batch="{batch_id}"][data-state="cancelled"]', timeout=WAIT_MS)
    assert page.locator(f'#batch-table tr[data-batch="{batch_id}"] button[data-action="cancel"]').is_disabled()
