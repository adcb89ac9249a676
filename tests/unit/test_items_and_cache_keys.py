"""Item ids never reach the filesystem unless they are plain names; cache keys are canonical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toposerve.brokers.cache_keys import feature_key, features_digest, prediction_key
from toposerve.models.items import DirectorySource, check_item_id
from toposerve.models.preprocessing import InputError

BAD_IDS = ["../x", "/etc/passwd", "a/b", "a\\b", "..", ".x", "x\x00", "~x", "a b", "é", "", "a" * 129, "a..b"]


@pytest.mark.parametrize("item_id", BAD_IDS)
async def test_bad_ids_are_refused_before_any_filesystem_call(item_id: str, monkeypatch, tmp_path: Path) -> None:
    source = DirectorySource(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("the filesystem was touched")

    for name in ("resolve", "is_file", "read_bytes", "exists", "open", "stat"):
        monkeypatch.setattr(Path, name, forbidden)
    with pytest.raises(InputError):
        await source.load(item_id)


@pytest.mark.parametrize("item_id", ["digit_3", "a", "A-1.v2", "x" * 128])
def test_plain_names_pass(item_id: str) -> None:
    assert check_item_id(item_id) == item_id


async def test_directory_source_finds_files_by_stem_and_nothing_outside(tmp_path: Path) -> None:
    inside = tmp_path / "items"
    inside.mkdir()
    (inside / "seven.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (inside / "link.png").symlink_to(tmp_path / "secret.png")
    source = DirectorySource(inside)
    assert await source.load("seven") == b"png"
    assert await source.load("missing") is None
    assert await source.load("link") is None  # a symlink leading out of the directory is not followed


def test_prediction_keys_depend_on_model_version_and_values_not_encoding() -> None:
    rows32 = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    rows64 = rows32.astype(np.float64)
    assert features_digest(rows32) == features_digest(rows64)
    assert prediction_key("ns", "iris", "1", rows32) != prediction_key("ns", "iris", "2", rows32)
    assert prediction_key("ns", "iris", "1", rows32) != prediction_key("ns", "iris", "1", rows32 + 0.1)
    assert prediction_key("ns", "iris", "1", rows32) != prediction_key("ns", "iris", "1", rows32.reshape(4, 1))
    assert prediction_key("a", "iris", "1", rows32).startswith("a:pred:iris:1:")
    assert feature_key("ns", "digits_fast", "1", "seven") == "ns:features:digits_fast:1:seven"
