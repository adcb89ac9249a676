"""RabbitMQ topic matching, so a process can tell from binding keys whether a routing key has a consumer."""

from __future__ import annotations

from collections.abc import Iterable


def topic_matches(pattern: str, key: str) -> bool:
    """Pure: does binding ``pattern`` match routing ``key``? ``*`` is one word, ``#`` zero or more."""
    return _match(pattern.split("."), key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # '#' swallows zero words, or one word and stays.
        return _match(rest, words) or (bool(words) and _match(pattern, words[1:]))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


def any_binding_matches(patterns: Iterable[str], key: str) -> bool:
    return any(topic_matches(pattern, key) for pattern in patterns)
