"""Every shipped profile's AsyncAPI document passes the official parser (npm ``@asyncapi/parser``).

``bash deploy/setup.sh`` installs the parser into ``.venv/asyncapi-parser`` when Node.js and
npm are on the machine (``apt-get install -y nodejs npm``); elsewhere point
``TOPOSERVE_ASYNCAPI_PARSER_DIR`` at a directory where ``npm install @asyncapi/parser@3`` ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from toposerve.brokers import Settings
from toposerve.deploy.asyncapi import asyncapi_document
from toposerve.deploy.components import load_checked_profile
from toposerve.deploy.profile import available_profiles

REPO = Path(__file__).resolve().parents[2]
VALIDATOR = REPO / "tests" / "support" / "validate_asyncapi.mjs"
PARSER_DIR = Path(os.environ.get("TOPOSERVE_ASYNCAPI_PARSER_DIR", REPO / ".venv" / "asyncapi-parser"))
HOW = ("the AsyncAPI parser is not installed: install Node.js and npm (apt-get install -y nodejs npm) and rerun "
       "bash deploy/setup.sh, or set TOPOSERVE_ASYNCAPI_PARSER_DIR to a directory where "
       "`npm install @asyncapi/parser@3` ran")


def validate(paths: list[Path]) -> tuple[int, list[dict]]:
    node = shutil.which("node")
    if node is None or not (PARSER_DIR / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.skip(HOW)
    result = subprocess.run([node, str(VALIDATOR), *map(str, paths)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ASYNCAPI_PARSER_DIR": str(PARSER_DIR)})
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_profiles_document_passes_the_official_parser(tmp_path: Path) -> None:
    settings = Settings()
    paths = []
    for name in available_profiles():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(asyncapi_document(load_checked_profile(name, settings), settings)))
        paths.append(path)
    code, reports = validate(paths)
    assert len(reports) == len(paths)
    assert code == 0 and all(not r["errors"] for r in reports), [r for r in reports if r["errors"]]


def test_the_parser_refuses_a_broken_document(tmp_path: Path) -> None:
    """So the test above can fail: a document without its info, with a nonsense operation."""
    settings = Settings()
    document = asyncapi_document(load_checked_profile("asynchronous", settings), settings)
    del document["info"]
    document["operations"]["nonsense"] = {"action": "shout"}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(document))
    code, [report] = validate([path])
    assert code == 1 and any("info" in error for error in report["errors"]), report
