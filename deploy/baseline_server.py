"""A plain FastAPI + ONNX Runtime server: the yardstick ``toposerve bench`` compares against.

No broker, no Redis, no stages: the request is validated, the model runs in the
request handler, the answer goes back. The same body and answer shape as our
``POST /v1/models/{model}/predict`` in sync profiles, so one load generator drives both.
Run: ``python -m deploy.baseline_server --port 8100 --workers 2``.
"""

from __future__ import annotations

import argparse
import os

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from toposerve.brokers import Settings
from toposerve.deploy.components import models_dir
from toposerve.models import InputError, InputLimits, ModelRegistry, rows_to_features, to_row_predictions


def create_baseline_app() -> FastAPI:
    settings = Settings()
    registry = ModelRegistry(models_dir(settings), intra_op_threads=1)
    limits = InputLimits.of(settings)
    app = FastAPI(title="baseline: FastAPI + ONNX Runtime")

    @app.post("/v1/models/{model}/predict")
    async def predict(model: str, request: Request) -> Response:
        loaded = registry.load(model)
        try:
            features = rows_to_features(orjson.loads(await request.body())["instances"], loaded.manifest, limits)
        except (InputError, KeyError, orjson.JSONDecodeError) as exc:
            return Response(orjson.dumps({"error": str(exc)}), status_code=422, media_type="application/json")
        labels, probabilities = loaded.run(features)
        rows = to_row_predictions(labels, probabilities, loaded.manifest.labels)
        return Response(orjson.dumps({"predictions": [row.model_dump() for row in rows]}),
                        media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    uvicorn.run("toposerve.deploy.baseline_server:create_baseline_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
