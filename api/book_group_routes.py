"""The book's horizontal microservice proxy, on a profile whose book model is a model group.

``POST /predict`` answers the book's per-model map (``{"setosa": {"prediction": [p, 1-p]},
...}``, keyed by each member's species), ``POST /predict/label`` the member whose
species probability is highest (``{"prediction": {"proba": p, "label": "virginica"}}``),
``GET /predict/get/test`` and ``GET /predict/post/test`` the map for the built-in
sample, ``GET /health/all`` each member's ``{"health": "ok" | "ng"}``.

The book's faults fixed: every row is answered (``predictions`` next to the first row's
``prediction``), a member that did not answer in the join timeout leaves its entry
``null`` with ``"status": "missing"`` instead of failing the request, and bad input is
a 4xx naming the problem. The call is answered synchronously through the ingress's
reply queue (as the Open Inference Protocol's infer), whatever the profile's mode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from toposerve.api.admission import ADMITTED
from toposerve.api.config import IngressConfig
from toposerve.api.errors import error_responses
from toposerve.api.ingress import Ingress
from toposerve.api.oip_routes import SyncAnswer, answer_jobs
from toposerve.api.openapi import ADMISSION_ERRORS, BODY_ERRORS, INPUT_ERRORS, SYNC_ERRORS, codes, success
from toposerve.api.responses import json_response
from toposerve.brokers import InferenceRequest, RowPrediction
from toposerve.models import ModelManifest

IRIS_SAMPLE = [[5.1, 3.5, 1.4, 0.2]]
BodyParser = Callable[[Request, Ingress, ModelManifest], Awaitable[InferenceRequest]]


class MemberAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction: list[float] | None = Field(description="The first row's [p_species, p_other]; null when missing")
    predictions: list[list[float] | None] = Field(description="Every row's [p_species, p_other]")
    status: str | None = Field(default=None, description="Only when the member did not answer: missing")


class BestLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proba: float
    label: str | None


class GroupLabelAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction: BestLabel
    predictions: list[BestLabel]


class MemberHealth(BaseModel):
    model_config = ConfigDict(extra="forbid")

    health: str


def members_by_species(config: IngressConfig, group_manifest: ModelManifest) -> list[tuple[str, str]]:
    """(member model, its species) in the group's order: a group's labels are its members' class 0."""
    return list(zip(config.groups[group_manifest.name], group_manifest.labels, strict=True))


def per_model_map(answer: SyncAnswer, members: list[tuple[str, str]]) -> dict:
    """The book's ``{species: {"prediction": [p_species, p_other]}}`` (pure)."""

    def pair(row: RowPrediction, member: str) -> list[float] | None:
        score = (row.scores or {}).get(member)
        return None if score is None else [score, 1.0 - score]

    result = {}
    for member, species in members:
        pairs = [pair(row, member) for row in answer.rows]
        entry: dict = {"prediction": pairs[0], "predictions": pairs}
        if member in answer.missing:
            entry["status"] = "missing"
        result[species] = entry
    return result


def best_label(answer: SyncAnswer, members: list[tuple[str, str]]) -> dict:
    """The book's ``{"prediction": {"proba", "label"}}``: the member whose species probability is highest (pure)."""
    species_of = dict(members)

    def best(row: RowPrediction) -> dict:
        scores = row.scores or {}
        if not scores:
            return {"proba": -1.0, "label": None}  # the book's initial value: nobody answered
        member = max(scores, key=scores.__getitem__)
        return {"proba": scores[member], "label": species_of[member]}

    labels = [best(row) for row in answer.rows]
    return {"prediction": labels[0], "predictions": labels}


def group_health(ingress: Ingress, members: list[tuple[str, str]]) -> dict:
    """Each member: ok when a queue its features reach has a consumer."""
    consumers = ingress.monitor.consumers if ingress.monitor else {}

    def up(member: str) -> bool:
        return any(consumers.get(queue.name, 0) > 0 for queue in ingress.config.queues
                   if f"features.{member}" in queue.binding_keys)

    return {species: {"health": "ok" if up(member) else "ng"} for member, species in members}


def group_metadata(manifest: ModelManifest, members: list[tuple[str, str]]) -> dict:
    return {"data_type": "float32", "data_structure": f"(1,{manifest.n_features})", "data_sample": IRIS_SAMPLE,
            "prediction_type": "float32", "prediction_structure": "(1,2)",
            "prediction_sample": {f"service_{species}": [0.97, 0.03] for _, species in members},
            "model": manifest.name, "version": manifest.version, "labels": manifest.labels}


def group_router(config: IngressConfig, parse_book_body: BodyParser, body_doc: dict) -> APIRouter:
    """The book's proxy routes for the model group ``config.book_model``; ``parse_book_body`` reads
    the book's field names (api/book_routes.py), ``body_doc`` documents them."""
    router = APIRouter(tags=["book-compatible"])
    errors = error_responses(codes(ADMISSION_ERRORS, INPUT_ERRORS, SYNC_ERRORS))
    body_errors = error_responses(codes(ADMISSION_ERRORS, BODY_ERRORS, INPUT_ERRORS, SYNC_ERRORS))
    per_model = {200: success(dict[str, MemberAnswer], "Each member's [p_species, p_other], keyed by species")}
    labelled = {200: success(GroupLabelAnswer, "The species whose member is most confident")}

    def ingress_of(request: Request) -> Ingress:
        return request.app.state.ingress

    def members(ingress: Ingress) -> list[tuple[str, str]]:
        return members_by_species(ingress.config, ingress.manifest(ingress.config.book_model))

    async def answered(ingress: Ingress, inference: InferenceRequest) -> SyncAnswer:
        return await answer_jobs(ingress, ingress.manifest(inference.model), [inference], ingress.config.spec.timeout_s)

    def sample(ingress: Ingress) -> InferenceRequest:
        return ingress.parse_predict_body(ingress.config.book_model, {"instances": IRIS_SAMPLE})

    async def posted(request: Request) -> tuple[Ingress, InferenceRequest]:
        ingress = ingress_of(request)
        return ingress, await parse_book_body(request, ingress, ingress.manifest(ingress.config.book_model))

    @router.get("/health/all", responses={200: success(dict[str, MemberHealth], "Each member, by species")})
    async def health_all(request: Request) -> Response:
        ingress = ingress_of(request)
        return json_response(group_health(ingress, members(ingress)))

    @router.get("/metadata", responses={200: success(dict, "The group's input and output")})
    async def metadata(request: Request) -> Response:
        ingress = ingress_of(request)
        return json_response(group_metadata(ingress.manifest(ingress.config.book_model), members(ingress)))

    # The book's proxy fans the sample out with GET (get/test) or POST (post/test) to its
    # services; here both publish it once to the group, so the answers are the same.
    @router.get("/predict/get/test", dependencies=ADMITTED, responses={**per_model, **errors})
    async def predict_get_test(request: Request) -> Response:
        ingress = ingress_of(request)
        return json_response(per_model_map(await answered(ingress, sample(ingress)), members(ingress)))

    @router.get("/predict/post/test", dependencies=ADMITTED, responses={**per_model, **errors})
    async def predict_post_test(request: Request) -> Response:
        ingress = ingress_of(request)
        return json_response(per_model_map(await answered(ingress, sample(ingress)), members(ingress)))

    @router.post("/predict", dependencies=ADMITTED, responses={**per_model, **body_errors}, openapi_extra=body_doc)
    async def predict(request: Request) -> Response:
        ingress, inference = await posted(request)
        return json_response(per_model_map(await answered(ingress, inference), members(ingress)))

    @router.post("/predict/label", dependencies=ADMITTED, responses={**labelled, **body_errors},
                 openapi_extra=body_doc)
    async def predict_label(request: Request) -> Response:
        ingress, inference = await posted(request)
        return json_response(best_label(await answered(ingress, inference), members(ingress)))

    return router
