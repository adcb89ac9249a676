"""The AMQP headers toposerve writes on messages it retries or dead-letters: part of the wire
contract, read by ``toposerve dead`` and by anyone replaying dead letters by hand."""

ATTEMPTS_HEADER = "x-toposerve-attempts"
REASON_HEADER = "x-toposerve-reason"
STAGE_HEADER = "x-toposerve-stage"
QUEUE_HEADER = "x-toposerve-queue"
# A retry goes straight to the stage's queue, which changes its routing key; the
# original key travels here so a dead letter can be replayed where it came from.
ROUTING_KEY_HEADER = "x-toposerve-routing-key"
# A dead letter that keeps only the head of its body says how long the body was.
TRUNCATED_HEADER = "x-toposerve-truncated-from"
