"""Batch inputs and result merging, without services."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from toposerve.brokers.batches import BatchManifest, ChunkMeta, batch_state, chunk_id, chunk_lines
from toposerve.deploy.profile import MODELS_DIR
from toposerve.models.preprocessing import InputLimits
from toposerve.models.registry import load_manifests
from toposerve.producers.batch_sources import BatchInputError, CsvSource, JsonlSource, open_source

MANIFESTS = load_manifests(MODELS_DIR)
IRIS = MANIFESTS["iris"]
LIMITS = InputLimits()


def source(tmp_path: Path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return open_source(path, IRIS, LIMITS)


def test_csv_header_is_detected_and_skipped(tmp_path: Path) -> None:
    with_header = source(tmp_path, "a.csv", "sepal length (cm),sepal width (cm),petal length (cm),petal width (cm)\n"
                                            "5.1,3.5,1.4,0.2\n\n6.7,3.0,5.2,2.3\n")
    without = source(tmp_path, "b.csv", "5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n")
    assert isinstance(with_header, CsvSource) and with_header.total == without.total == 2
    (a,) = with_header.chunks(10)
    (b,) = without.chunks(10)
    assert np.array_equal(a.features, b.features) and a.features.dtype == np.float32 and not a.errors


def test_a_bad_first_row_is_not_taken_for_a_header(tmp_path: Path) -> None:
    src = source(tmp_path, "c.csv", "5.1,x,1.4,0.2\n6.7,3.0,5.2,2.3\n")
    assert src.total == 2
    (chunk,) = src.chunks(10)
    assert list(chunk.errors) == [0] and "'x'" in chunk.errors[0] and len(chunk.features) == 1


def test_chunks_cover_every_row_in_order_and_skip_the_given_ones(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},1,1,1" for i in range(25))
    src = source(tmp_path, "d.csv", rows)
    chunks = list(src.chunks(10))
    assert [(c.index, c.start, c.rows) for c in chunks] == [(0, 0, 10), (1, 10, 10), (2, 20, 5)]
    assert chunks[2].features[:, 0].tolist() == [20, 21, 22, 23, 24]
    assert [c.index for c in src.chunks(10, skip={0, 2})] == [1]


def test_jsonl_is_sniffed_and_each_line_is_one_row(tmp_path: Path) -> None:
    src = source(tmp_path, "rows", '[5.1,3.5,1.4,0.2]\n{"instances": [6.7,3.0,5.2,2.3]}\n{"instances": [[1,2,3,4]]}\n'
                                   '[true,1,2,3]\n{"instances": [[1,2,3,4],[1,2,3,4]]}\nnot json\n')
    assert isinstance(src, JsonlSource) and src.total == 6
    (chunk,) = src.chunks(100)
    assert len(chunk.features) == 3 and sorted(chunk.errors) == [3, 4, 5]
    assert "not valid JSON" in chunk.errors[5]


@pytest.mark.parametrize("text,match", [("", "empty"), ("\n \n", "empty"),
                                        ("sepal_length,sepal_width,petal_length,petal_width\n", "no rows")])
def test_empty_inputs_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(BatchInputError, match=match):
        source(tmp_path, "e.csv", text)


def test_wrong_kind_of_input_for_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="not a directory"):
        open_source(tmp_path, IRIS, LIMITS)
    (tmp_path / "f.csv").write_text("1,2\n")
    with pytest.raises(BatchInputError, match="takes images"):
        open_source(tmp_path / "f.csv", MANIFESTS["digits_fast"], LIMITS)


def test_fingerprint_follows_the_content(tmp_path: Path) -> None:
    assert source(tmp_path, "g.csv", "1,2,3,4\n").fingerprint == source(tmp_path, "h.csv", "1,2,3,4\n").fingerprint
    assert source(tmp_path, "g.csv", "1,2,3,4\n").fingerprint != source(tmp_path, "h.csv", "1,2,3,5\n").fingerprint


def test_chunk_ids_are_deterministic_per_batch_and_index() -> None:
    assert chunk_id("b1", 0) == chunk_id("b1", 0)
    assert len({chunk_id("b1", 0), chunk_id("b1", 1), chunk_id("b2", 0)}) == 3


def test_chunk_lines_merge_row_errors_predictions_and_pending() -> None:
    manifest = BatchManifest(id="b", model="iris", total=5, chunks=2, chunk_rows=3, created=0)
    meta = ChunkMeta(sent=2, errors={1: "row 1: bad"})
    result = {"v": "1", "c": [2, 0], "p": [[0, 0, 1], [1, 0, 0]]}
    lines = [orjson.loads(line) for line in chunk_lines(manifest.chunk_range(0), meta, result, IRIS.labels)]
    assert [line["row"] for line in lines] == [0, 1, 2]
    assert [line["status"] for line in lines] == ["succeeded", "failed", "succeeded"]
    assert lines[0]["label"] == IRIS.labels[2] and lines[2]["label"] == IRIS.labels[0]
    pending = [orjson.loads(line) for line in chunk_lines(manifest.chunk_range(1), None, None, IRIS.labels)]
    assert [(line["row"], line["status"]) for line in pending] == [(3, "pending"), (4, "pending")]
    failed = [orjson.loads(line) for line in chunk_lines(range(2), ChunkMeta(sent=2, errors={}),
                                                          {"error": {"code": "internal", "message": "m"}}, [])]
    assert all(line["error"]["code"] == "internal" for line in failed)


def test_batch_state() -> None:
    assert batch_state(10, 5, 0) == "running"
    assert batch_state(10, 10, 0) == "succeeded"
    assert batch_state(10, 0, 10) == "failed"
    assert batch_state(10, 9, 1) == "partial"
    assert batch_state(10, 5, 0, cancelled=True) == "cancelled"  # never succeeded, even once every row is done
    assert batch_state(10, 10, 0, cancelled=True) == "cancelled"
