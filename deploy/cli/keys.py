"""``toposerve keys``: lines for the ingress's API keys file (TOPOSERVE_API_KEYS_FILE)."""

from __future__ import annotations

import secrets

import click

from toposerve.api import key_file_line


@click.group()
def keys() -> None:
    """Make API keys and the lines of a keys file (only sha256 digests are stored)."""


@keys.command("hash")
@click.option("--id", "key_id", required=True, help="Key id: recorded as the owner of the key's jobs")
@click.option("--key", "key", default=None,
              help="The key to hash (default: read from stdin, or generate one with --generate)")
@click.option("--generate", is_flag=True, help="Generate a new random key and print it once on stderr")
def hash_(key_id: str, key: str | None, generate: bool) -> None:
    """Print `<key-id>:<sha256 hex>` for a keys file.

    \b
    toposerve keys hash --id alice --generate >> keys.txt   # the key is shown once, on stderr
    printf %s "$KEY" | toposerve keys hash --id alice >> keys.txt
    """
    if generate:
        key = secrets.token_urlsafe(32)
        click.echo(f"key for {key_id} (store it now, it is not kept): {key}", err=True)
    elif key is None:
        key = click.get_text_stream("stdin").read().strip()
    if not key:
        raise click.ClickException("no key given: pass --key, pipe it on stdin, or use --generate")
    try:
        click.echo(key_file_line(key_id, key))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
