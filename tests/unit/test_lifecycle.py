"""The lifecycle's pure parts: which queues a profile has, the record, the refusal's wording."""

from __future__ import annotations

from toposerve.deploy.lifecycle import OtherProfileLive, ProfileRecord, profile_queues
from toposerve.deploy.profile import load_profile


def test_a_profiles_queues_are_its_stage_queues_and_an_aggregates_delay_queue() -> None:
    queues = {q.name: q.binding_keys for q in profile_queues(load_profile("horizontal_microservice"), "ns")}
    assert all(name.startswith("ns.horizontal_microservice.") for name in queues)
    delay = [name for name in queues if name.endswith(".delay")]
    assert len(delay) == 1 and queues[delay[0]][0].startswith("join-wait.")
    asynchronous = profile_queues(load_profile("asynchronous"), "ns")
    assert [(q.name, q.binding_keys) for q in asynchronous] == [
        ("ns.asynchronous.preprocess", ["request.*"]), ("ns.asynchronous.predict", ["features.*"]),
        ("ns.asynchronous.store", ["prediction.*", "failure.*"])]


def test_the_record_survives_its_json() -> None:
    record = ProfileRecord(profile="asynchronous", state="unbound", queues=profile_queues(load_profile("asynchronous"), "ns"))
    assert ProfileRecord.model_validate_json(record.model_dump_json()) == record


def test_the_refusal_names_the_other_profile_and_both_ways_out() -> None:
    message = str(OtherProfileLive("ns", "batch", ["asynchronous"]))
    assert "namespace 'ns' has profile 'asynchronous' live" in message
    assert "`toposerve up --profile batch --replace`" in message
    assert "`toposerve down --profile asynchronous`" in message
