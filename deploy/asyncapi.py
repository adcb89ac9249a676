"""The AsyncAPI 3.0 document of a profile: its routing keys, who publishes and consumes them, and the
JSON Schemas of the messages, generated from the same pydantic types the stages validate with.

Channels are routing keys on the ``{ns}.inference`` topic exchange (``request.iris``, ...);
operations are the ingress's and each stage's sends and receives. Anyone can generate a client
from it and publish to the queues from another language.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from toposerve.brokers import (
    Failure,
    Features,
    InferenceRequest,
    JoinTick,
    Prediction,
    Settings,
    Telemetry,
    dead_exchange_name,
    exchange_name,
    topic_matches,
)
from toposerve.deploy.profile import MODELS_DIR, AggregateSpec, PredictSpec, PreprocessSpec, Profile
from toposerve.models import load_manifests

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"

MESSAGE_TYPES: dict[str, type[BaseModel]] = {
    "request": InferenceRequest,
    "features": Features,
    "prediction": Prediction,
    "failure": Failure,
    "telemetry": Telemetry,
    "join": JoinTick,
}


def tabular_names(profile: Profile, models_dir: Path) -> set[str]:
    """The profile's models and groups that take rows (a group takes its members' input)."""
    manifests = load_manifests(models_dir)
    tabular = {m for m in profile.models if manifests[m].preprocessing.kind == "tabular"}
    return tabular | {g for g, spec in profile.groups.items() if spec.models[0] in tabular}


def _produced(profile: Profile, tabular: set[str] | None = None) -> dict[str, set[str]]:
    """Routing key -> who publishes it (``ingress`` or stage names); ``tabular``: models taking rows."""
    names = [*profile.models, *profile.groups]
    produced: dict[str, set[str]] = {}

    def add(key: str, who: str) -> None:
        produced.setdefault(key, set()).add(who)

    for name in names:
        add(f"request.{name}", "ingress")
    if profile.ingress.prediction_cache_ttl_s:
        for model in profile.models:
            add(f"features.{model}", "ingress")  # the ingress preprocesses to key the cache
    if profile.ingress.preprocess_tabular_in_ingress:
        for name in sorted(tabular or ()):
            add(f"features.{name}", "ingress")  # rows preprocessed in the ingress skip request.<name>
    for stage_name, spec in profile.stages.items():
        if isinstance(spec, PreprocessSpec):
            for name in names:
                add(f"features.{name}", stage_name)
                add(f"failure.{name}", stage_name)
        elif isinstance(spec, PredictSpec):
            for model in profile.stage_models(stage_name):
                add(f"prediction.{model}", stage_name)
                add(f"failure.{model}", stage_name)
            for group, member in profile.group_parts(stage_name).items():
                add(f"prediction.{group}.{member}", stage_name)
                add(f"failure.{group}.{member}", stage_name)
            if spec.cascade is not None:
                add(f"features.{spec.cascade.next_model}", stage_name)
        elif isinstance(spec, AggregateSpec):
            add(f"prediction.{spec.group}", stage_name)
            add(f"failure.{spec.group}", stage_name)
    return produced


def profile_routing_keys(profile: Profile) -> list[str]:
    """Every concrete routing key a profile publishes or consumes."""
    produced = _produced(profile)
    names = [*profile.models, *profile.groups]
    candidates = set(produced)
    candidates |= {f"{kind}.{name}" for kind in MESSAGE_TYPES for name in names}
    candidates |= {f"{kind}.{group}.{member}" for kind in ("prediction", "failure")
                   for group, spec in profile.groups.items() for member in spec.models}
    patterns = [pattern for spec in profile.stages.values() for pattern in spec.consumes]
    return sorted(key for key in candidates
                  if key in produced or any(topic_matches(pattern, key) for pattern in patterns))


def asyncapi_document(profile: Profile, settings: Settings) -> dict:
    ns = settings.namespace
    exchange = {"name": exchange_name(ns), "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"}
    _, defs = models_json_schema([(model, "validation") for model in MESSAGE_TYPES.values()],
                                 ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    messages = {}
    for kind, model in MESSAGE_TYPES.items():
        messages[model.__name__] = {
            "name": model.__name__,
            "title": model.__name__,
            "summary": (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "",
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
            "bindings": {"amqp": {"messageType": kind, "bindingVersion": AMQP_BINDING_VERSION}},
        }

    produced = _produced(profile, tabular_names(profile, Path(settings.models_dir or MODELS_DIR)))
    channels: dict[str, dict] = {}
    operations: dict[str, dict] = {}
    for key in profile_routing_keys(profile):
        kind = key.split(".", 1)[0]
        message = MESSAGE_TYPES[kind].__name__
        channels[key] = {
            "address": key,
            "title": key,
            "description": f"Routing key {key!r} on exchange {exchange['name']!r}: {message} bodies (JSON).",
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
            "bindings": {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": AMQP_BINDING_VERSION}},
        }
        ref = {"$ref": f"#/channels/{key}"}
        message_ref = [{"$ref": f"#/channels/{key}/messages/{message}"}]
        for who in sorted(produced.get(key, ())):
            operations[f"{who}.send.{key}"] = {
                "action": "send", "channel": ref, "messages": message_ref,
                "summary": f"{who} publishes {message} with routing key {key}",
            }
        for stage_name, spec in profile.stages.items():
            bound = [pattern for pattern in spec.consumes if topic_matches(pattern, key)]
            if bound:
                queue = profile.queue_spec(ns, stage_name).name
                operations[f"{stage_name}.receive.{key}"] = {
                    "action": "receive", "channel": ref, "messages": message_ref,
                    "summary": f"stage {stage_name} ({spec.kind}) consumes {key} from queue {queue} "
                               f"(bound to {', '.join(bound)})",
                    "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
                }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"toposerve profile {profile.name}",
            "version": "0.1.0",
            "description": (
                f"{profile.description}\n\nMessages travel on the topic exchange {exchange['name']!r} "
                f"(dead letters: {dead_exchange_name(ns)!r}). Bodies are JSON; tensors are base64 of raw "
                "little-endian bytes with dtype and shape. A synchronous caller sets the AMQP reply_to and "
                "correlation_id properties; the stage that ends the job publishes the terminal Prediction or "
                "Failure there too. The W3C traceparent AMQP header carries trace context across hops."
                + (" In this profile the ingress preprocesses tabular rows itself and publishes them as "
                   "Features to features.<model>, with the same reply_to, correlation_id, deadline and "
                   "trace; request.<model> (images, item ids, any other publisher) still reaches the "
                   "preprocess stage." if profile.ingress.preprocess_tabular_in_ingress else "")
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "127.0.0.1:5672", "protocol": "amqp", "protocolVersion": "0.9.1",
                "description": "The broker of TOPOSERVE_AMQP_URL",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
