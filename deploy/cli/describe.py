"""``toposerve topology | asyncapi | profiles``: what a profile declares, without running it."""

from __future__ import annotations

import click

from toposerve.brokers import Settings, dead_exchange_name, dead_queue_name, exchange_name
from toposerve.deploy.cli.common import checked_profile
from toposerve.deploy.components import keeps_outcomes
from toposerve.deploy.profile import Profile, available_profiles


@click.command()
@click.option("--profile", "profile_name", required=True)
def topology(profile_name: str) -> None:
    """Print the exchanges, queues, bindings and stages of a profile."""
    settings = Settings()
    profile = checked_profile(profile_name, settings)
    ns = settings.namespace
    click.echo(f"profile {profile.name}: {profile.description}")
    publishes = ("features.<model> for rows (preprocessed in the ingress), request.<model> for images and items"
                 if profile.ingress.preprocess_tabular_in_ingress else "request.<model>")
    kept = (f"; results live {profile.ingress.result_ttl_s}s" if keeps_outcomes(profile)
            else "; answers go to the caller's reply queue and are not kept")
    click.echo(f"  ingress: mode={profile.ingress.mode} http://{profile.ingress.host}:{profile.ingress.port} "
               f"publishes {publishes}{kept}")
    click.echo(f"  models: {', '.join(profile.models)}")
    for model, policy in profile.versions.items():
        canary = f", canary {model}@{policy.canary.version} {policy.canary.percent:g}%" if policy.canary else ""
        shadow = f", shadow {model}@{policy.shadow}" if policy.shadow else ""
        click.echo(f"  versions: {model}@{policy.serve or '(manifest)'} serves{canary}{shadow} "
                   f"(keys request|features.{model}.v<version>)")
    for group, spec in profile.groups.items():
        click.echo(f"  group {group}: {', '.join(spec.models)} (one request to all; joined within "
                   f"{spec.join_timeout_s:g}s by an aggregate stage)")
    click.echo("exchanges:")
    click.echo(f"  {exchange_name(ns)} (topic, durable)")
    bounds = profile.dead_letters
    click.echo(f"  {dead_exchange_name(ns)} (topic, durable, dead letters) -> queue {dead_queue_name(ns)} [#] "
               f"(at most {bounds.max_length or 'any number of'} messages, {bounds.max_bytes or 'any number of'} "
               "bytes; the oldest dropped past them)")
    click.echo("stages (queue <- bindings):")
    for name, stage in profile.stages.items():
        spec = profile.queue_spec(ns, name)
        knobs = [f"kind={stage.kind}", f"replicas={stage.replicas}", f"prefetch={stage.prefetch}"]
        if stage.kind == "predict":
            knobs += [f"max_batch_size={stage.max_batch_size}", f"max_batch_delay_ms={stage.max_batch_delay_ms}",
                      f"models={','.join(profile.stage_models(name))}"]
        if stage.kind == "custom":
            knobs.append(f"handler={stage.handler}")
        if getattr(stage, "publishes", None):
            knobs.append(f"publishes={stage.publishes}")
        if spec.max_length:
            knobs.append(f"max_queue_length={spec.max_length}")
        click.echo(f"  {name}: {spec.name} ({spec.queue_type}) <- {', '.join(spec.binding_keys)}")
        click.echo(f"      {' '.join(knobs)}")
    click.echo(f"flow: {flow(profile)}")
    if profile.ingress.preprocess_tabular_in_ingress:
        click.echo("      rows: ingress -> features.<model> -> predict -> ... (the preprocess stage is skipped)")


def flow(profile: Profile) -> str:
    """The path of a request through this profile's stage kinds, as far as it goes."""
    kinds = {stage.kind for stage in profile.stages.values()}
    steps = ["request.<model>"]
    if "preprocess" in kinds:
        steps += ["preprocess", "features.<model>"]
    custom = [name for name, stage in profile.stages.items() if stage.kind == "custom"]
    scored = next((s.publishes for s in profile.stages.values() if s.kind == "predict" and s.publishes), None)
    if "predict" in kinds and scored:
        steps += ["predict", scored.replace("{model}", "<model>")]
    elif "predict" in kinds:
        steps += ["predict", "prediction.<model> | failure.<model>"]
    if custom:  # a user's stages, in the order the profile lists them
        steps += [*(f"{name} (custom)" for name in custom), "prediction.<model> | failure.<model>"]
    if "aggregate" in kinds:
        steps += ["aggregate", "prediction.<group>"]
    if "store" in kinds or "batch_store" in kinds:
        steps += ["store", "Redis"]
    if profile.ingress.mode != "async":
        steps.append("the caller's reply queue")
    if "telemetry" in kinds:
        steps.append("(and telemetry.<model> -> telemetry -> Redis)")
    return " -> ".join(steps)


@click.command()
@click.option("--profile", "profile_name", default="asynchronous", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["json", "yaml"]), default="json", show_default=True)
def asyncapi(profile_name: str, fmt: str) -> None:
    """Print the AsyncAPI 3.0 document of a profile's message contracts (routing keys, schemas)."""
    import json

    import yaml

    from toposerve.deploy.asyncapi import asyncapi_document

    settings = Settings()
    document = asyncapi_document(checked_profile(profile_name, settings), settings)
    if fmt == "yaml":
        click.echo(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), nl=False)
    else:
        click.echo(json.dumps(document, indent=2))


@click.command()
def profiles() -> None:
    """List the profiles that ship with toposerve."""
    for name in available_profiles():
        click.echo(name)
