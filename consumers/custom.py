"""A user's own stage: a plain function over toposerve's message types, wired in by a profile.

    # mypkg/stages.py
    from toposerve.brokers import Prediction

    async def handle(message: Prediction) -> Prediction:
        return message.model_copy(update={"rows": ...})

    # the profile
    stages:
      labels:
        kind: custom
        handler: mypkg.stages:handle
        consumes: ["scored.*"]

As in FastStream, the first parameter's annotation says what the body is: one of
toposerve's message types (``InferenceRequest``, ``Features``, ``Prediction``,
``Failure``) or a union of them. The function returns a message, a list of messages, or
None (nothing to publish). Each is published under its own routing key
(``{kind}.{model}``), or under the profile's ``publishes`` template. Raise ``InputError``
for bad input (the job fails with that message), ``TransientError`` when a dependency is
down (the message is requeued); any other exception is retried, then dead-lettered. The
settlement policy does the rest (consumers/settlement.py), as for every built-in stage.

A plain ``def`` runs in a worker thread, so it may block (a database call) without
stalling the stage's event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Union

from pydantic import TypeAdapter

from toposerve.brokers import Envelope, Failure, Prediction, published_key
from toposerve.consumers.stage import Outgoing, Stage

Handler = Callable[[Any], Any]


class HandlerError(ValueError):
    """A ``handler`` that cannot be loaded or has no usable input type (named in the message)."""


def load_handler(path: str) -> Handler:
    """``module:function`` -> the function."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise HandlerError(f"handler {path!r} must be 'module:function', e.g. 'mypkg.stages:handle'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"handler {path!r}: cannot import {module_name!r} ({exc})") from exc
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise HandlerError(f"handler {path!r}: {module_name!r} has no {attribute!r}")
    if not callable(target):
        raise HandlerError(f"handler {path!r} is not callable")
    return target


def input_types(handler: Handler) -> tuple[type[Envelope], ...]:
    """The message types a handler takes, from its first parameter's annotation."""
    parameters = list(inspect.signature(handler).parameters.values())
    if not parameters:
        raise HandlerError(f"{_name(handler)} takes no parameter; it must take the message")
    hints = typing.get_type_hints(handler)
    annotation = hints.get(parameters[0].name)
    if annotation is None:
        raise HandlerError(f"{_name(handler)}: annotate its first parameter with the message type it takes, "
                           "e.g. 'message: Prediction'")
    found = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if not all(isinstance(t, type) and issubclass(t, Envelope) for t in found):
        raise HandlerError(f"{_name(handler)}: its first parameter is {annotation!r}; it must be one of "
                           "toposerve's message types (InferenceRequest, Features, Prediction, Failure) or a union")
    return found


def _name(handler: Handler) -> str:
    return f"{getattr(handler, '__module__', '?')}:{getattr(handler, '__qualname__', repr(handler))}"


class CustomStage(Stage):
    """Runs a user's handler (module doc); what it returns is published like any stage's output."""

    kind: ClassVar[str] = "custom"
    input_type: ClassVar[type[Envelope]] = Envelope

    def __init__(self, name: str, handler: Handler, publishes: str | None = None) -> None:
        super().__init__(name)
        self.handler = handler
        self.accepts = input_types(handler)
        self._adapter: TypeAdapter[Any] = TypeAdapter(
            self.accepts[0] if len(self.accepts) == 1 else Union[self.accepts])  # noqa: UP007 - built at run time
        # A routing-key template for every output ({kind}, {model}); None: each output's own key.
        self.publishes = publishes
        self._async = inspect.iscoroutinefunction(handler)
        # A stage that takes outcomes turns them into outcomes: only a stage's own may enter.
        self.outcomes_from_stages_only = any(issubclass(t, Prediction | Failure) for t in self.accepts)

    def input_name(self) -> str:
        return " | ".join(t.__name__ for t in self.accepts)

    def decode(self, body: bytes) -> Envelope:
        return self._adapter.validate_json(body)

    async def handle(self, message: Envelope) -> list[Outgoing]:
        result = await self.handler(message) if self._async else await asyncio.to_thread(self.handler, message)
        outputs = [] if result is None else result if isinstance(result, list | tuple) else [result]
        for output in outputs:
            if not isinstance(output, Envelope):
                raise TypeError(f"handler {_name(self.handler)} returned a {type(output).__name__}; it must "
                                "return toposerve messages (or a list of them, or None)")
        return [Outgoing(body=output, routing_key=self.routing_key(output)) for output in outputs]

    def routing_key(self, output: Envelope) -> str:
        if self.publishes is None:
            return output.routing_key()  # a part's key has its part
        return published_key(self.publishes, output.kind, output.model)
