"""``toposerve ui``: the URL of an ingress's operator page (``/ui``), checked, and opened on request."""

from __future__ import annotations

import webbrowser

import click
import httpx

from toposerve.deploy.cli.common import say


@click.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The ingress (as `toposerve up` printed)")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser")
def ui(url: str, open_browser: bool) -> None:
    """Print the operator's page of a running ingress: the live topology, jobs, dead letters, try it."""
    page = url.rstrip("/") + "/ui"
    try:
        response = httpx.get(page, timeout=3.0)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"no ingress answers at {url} ({type(exc).__name__}); start one with "
                                   "`toposerve up --profile NAME`, or give its address with --url") from exc
    if response.status_code != 200:
        raise click.ClickException(f"{page} answered {response.status_code}: is this a toposerve ingress?")
    click.echo(page)
    if open_browser and not webbrowser.open(page):
        say("no browser could be opened here; open the address above")
