"""``toposerve edge ...``: the edge AI client (pull models, predict on-device, serve locally, report telemetry).

Composition only: the work is in ``toposerve.producers`` (edge*) (cache, runtime, spool,
forwarding, agent) and ``toposerve.api.edge_local`` (the local HTTP endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import click
import httpx
import platformdirs

from toposerve.brokers import Settings
from toposerve.models import InputError
from toposerve.producers import (
    DEFAULT_MAX_REPORTS,
    EdgeAgent,
    EdgeError,
    EdgeRuntime,
    ForwardResult,
    ModelCache,
    Spool,
    client_id_of,
    spool_and_forward,
    spool_dir,
)

DEFAULT_PORT = 8765


def default_cache_dir() -> Path:
    return platformdirs.user_cache_path("toposerve") / "edge"


def say(text: str) -> None:
    click.echo(f"toposerve edge: {text}", err=True)


def _cache_option(function):
    return click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help=f"Model cache and telemetry spool (default: {default_cache_dir()})")(function)


def _amqp_option(function):
    return click.option("--amqp-url", default=None,
                        help="Broker that receives telemetry (default: TOPOSERVE_AMQP_URL)")(function)


def _client_option(function):
    return click.option("--client-id", default=None,
                        help="This client's id in telemetry (default: one made once per cache dir)")(function)


def _runtime(cache_dir: Path, client_id: str | None) -> EdgeRuntime:
    try:
        return EdgeRuntime(cache_dir, client_id or client_id_of(cache_dir))
    except EdgeError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot use the cache directory {cache_dir}: {exc}") from exc


def _report_telemetry(results: dict[str, ForwardResult]) -> None:
    for model, result in results.items():
        if result.error and result.pending:
            say(f"telemetry of {model}: {result.pending} reports kept in the spool, sent when the broker is "
                 f"reachable ({result.error})")


def _auth_headers(settings: Settings) -> dict[str, str]:
    """TOPOSERVE_API_KEY, for an ingress that requires API keys (README, "Security")."""
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


@click.group()
def edge() -> None:
    """Edge AI client: models pulled from a server, inference on this machine, telemetry reported back."""


@edge.command()
@click.option("--server", required=True, help="Base URL of a toposerve ingress running the edge_ai profile")
@click.option("--model", "models", required=True, multiple=True, help="Model to pull (repeat for several)")
@_cache_option
@click.option("--force", is_flag=True, help="Download even if the cached version is current")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per HTTP request")
def pull(server: str, models: tuple[str, ...], cache_dir: Path | None, force: bool, timeout: float) -> None:
    """Download models (sha256-verified); the previous version stays in use until the new one is verified."""
    root = cache_dir or default_cache_dir()

    async def run() -> int:
        failed = 0
        async with httpx.AsyncClient(timeout=timeout, headers=_auth_headers(Settings())) as http:
            for model in models:
                try:
                    result = await ModelCache(root, model).pull(http, server, force=force)
                except EdgeError as exc:
                    say(str(exc))
                    failed += 1
                    continue
                if result.status == "updated":
                    previous = f"; version {result.previous_version} kept as the rollback" \
                        if result.previous_version else ""
                    click.echo(f"{model}: updated to version {result.version} "
                               f"(sha256 {result.sha256}){previous}")
                else:
                    click.echo(f"{model}: version {result.version} is current (sha256 {result.sha256})")
        return failed

    if asyncio.run(run()):
        sys.exit(1)


@edge.command()
@click.option("--model", required=True, help="A model pulled before (see `toposerve edge pull`)")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@_cache_option
@_amqp_option
@_client_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image, with probabilities")
@click.option("--telemetry/--no-telemetry", default=True, show_default=True,
              help="Report the predictions (spooled when the broker is unreachable)")
def predict(model: str, images: tuple[Path, ...], cache_dir: Path | None, amqp_url: str | None,
            client_id: str | None, as_json: bool, telemetry: bool) -> None:
    """Print the predicted label of each IMAGE, inferred on this machine (no server needed)."""
    root = cache_dir or default_cache_dir()
    runtime = _runtime(root, client_id)
    try:
        runtime.load(model)
    except EdgeError as exc:
        raise click.ClickException(str(exc)) from exc
    failed = 0
    for path in images:
        try:
            prediction = runtime.predict(model, image_bytes=path.read_bytes())
        except OSError as exc:
            say(f"{path}: cannot read the file ({exc.strerror or exc})")
            failed += 1
            continue
        except InputError as exc:
            say(f"{path}: {exc.message}")
            failed += 1
            continue
        row = prediction.rows[0]
        if as_json:
            click.echo(json.dumps({"image": str(path), "model": model, "model_version": prediction.model_version,
                                   **row.model_dump()}))
        else:
            click.echo(f"{path}\t{row.label}")
    if telemetry:
        settings = Settings()
        results = asyncio.run(spool_and_forward(runtime.take_reports(), root, [model],
                                                amqp_url or settings.amqp_url, settings.namespace))
        _report_telemetry(results)
    if failed:
        sys.exit(1)


@edge.command()
@click.option("--server", required=True, help="Base URL of a toposerve ingress running the edge_ai profile")
@click.option("--model", "models", required=True, multiple=True, help="Model to serve (repeat for several)")
@_cache_option
@_amqp_option
@_client_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--poll-interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds between update checks (a 304 when nothing changed)")
@click.option("--report-interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds between telemetry reports")
@click.option("--max-spooled", type=click.IntRange(min=1), default=DEFAULT_MAX_REPORTS, show_default=True,
              help="Reports kept per model while the broker is unreachable (oldest dropped, and counted)")
def run(server: str, models: tuple[str, ...], cache_dir: Path | None, amqp_url: str | None, client_id: str | None,
        host: str, port: int, poll_interval: float, report_interval: float, max_spooled: int) -> None:
    """Serve POST /v1/models/{model}/predict on this machine and keep the models current."""
    import uvicorn

    from toposerve.api import create_edge_app
    from toposerve.deploy.processes import configure_logging

    configure_logging("WARNING")
    root = cache_dir or default_cache_dir()
    settings = Settings()
    runtime = _runtime(root, client_id)

    async def serve() -> None:
        async with httpx.AsyncClient(timeout=30, headers=_auth_headers(settings)) as http:
            agent = EdgeAgent(runtime, list(models), server, http, amqp_url or settings.amqp_url,
                              settings.namespace, max_spooled, say=say)
            await agent.refresh_once()
            for model in models:
                if model not in runtime.models:
                    try:
                        runtime.load(model)
                    except EdgeError as exc:
                        raise click.ClickException(str(exc)) from exc

            @contextlib.asynccontextmanager
            async def lifespan(_app) -> AsyncIterator[None]:
                stop = asyncio.Event()
                loops = asyncio.create_task(agent.run(stop, poll_interval, report_interval))
                try:
                    yield
                finally:
                    stop.set()
                    await loops

            app = create_edge_app(runtime, settings.max_body_bytes, lifespan=lifespan)
            versions = ", ".join(f"{m} v{runtime.models[m].pointer.version}" for m in models)
            say(f"serving {versions} on http://{host}:{port}/v1/models/{{model}}/predict "
                 f"(updates from {server} every {poll_interval:g}s)")
            await uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                access_log=False)).serve()

    asyncio.run(serve())


@edge.command()
@_cache_option
@_amqp_option
def flush(cache_dir: Path | None, amqp_url: str | None) -> None:
    """Send the spooled telemetry now."""
    root = cache_dir or default_cache_dir()
    settings = Settings()
    models = sorted(path.stem for path in spool_dir(root).glob("*.jsonl"))
    results = asyncio.run(spool_and_forward([], root, models, amqp_url or settings.amqp_url, settings.namespace))
    for model, result in results.items():
        click.echo(f"{model}: {result.sent} sent, {result.pending} pending")
    _report_telemetry(results)
    if any(result.pending for result in results.values()):
        sys.exit(1)


@edge.command()
@_cache_option
def status(cache_dir: Path | None) -> None:
    """Show the cached models and the telemetry spool."""
    root = cache_dir or default_cache_dir()
    click.echo(f"cache: {root}")
    for directory in sorted((root / "models").glob("*")) if (root / "models").is_dir() else ():
        try:
            pointer = ModelCache(root, directory.name).current()
        except EdgeError as exc:
            click.echo(f"  {directory.name}: {exc}")
            continue
        if pointer is not None:
            rollback = f", rollback v{pointer.previous_version}" if pointer.previous_version else ""
            click.echo(f"  {pointer.model}: v{pointer.version} sha256 {pointer.sha256[:16]}… "
                       f"from {pointer.server} at {pointer.pulled_at:%Y-%m-%d %H:%M:%S}Z{rollback}")
    for path in sorted(spool_dir(root).glob("*.jsonl")):
        stats = Spool(spool_dir(root), path.stem).stats()
        click.echo(f"  spool {path.stem}: {stats.pending} reports pending, {stats.dropped_total} dropped when full")
