"""``GET /v1/models/{model}/versions`` (which versions exist and which serves) and
``GET /v1/models/{model}/shadow`` (how the shadow version compares with the serving one)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from toposerve.api.errors import ApiError, error_responses
from toposerve.api.ingress import Ingress
from toposerve.api.openapi import success
from toposerve.api.responses import json_response
from toposerve.brokers import CanarySpec, ShadowComparison, ShadowStore

router = APIRouter(prefix="/v1")


class VersionEntry(BaseModel):
    version: str
    sha256: str
    description: str
    test_accuracy: float | None


class VersionsReport(BaseModel):
    model: str
    serving: str = Field(description="The version that answers now (promoted, else the profile's serve)")
    canary: CanarySpec | None
    shadow: str | None
    versions: list[VersionEntry]


class VersionLatency(BaseModel):
    serve_ms: float | None = Field(description="Mean milliseconds of the serving version per job")
    shadow_ms: float | None = Field(description="Mean milliseconds of the shadow version per job")


class ShadowReport(BaseModel):
    model: str
    serve_version: str
    shadow_version: str
    jobs: int = Field(description="Jobs both versions answered")
    agreed: int = Field(description="Jobs on which every row got the same label")
    agreement_rate: float | None = Field(description="agreed / jobs (null before the first job)")
    rows: int
    rows_agreed: int
    latency: VersionLatency
    disagreements: list[ShadowComparison] = Field(description="The newest disagreeing jobs, with their inputs "
                                                               "(a bounded sample)")


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


def _mean_ms(seconds: float, jobs: int) -> float | None:
    return round(seconds * 1000 / jobs, 4) if jobs else None


@router.get("/models/{model}/versions", responses={200: success(VersionsReport, "The model's versions"),
                                                   **error_responses({404: "unknown_model"})})
async def model_versions(model: str, request: Request) -> Response:
    ingress = _ingress(request)
    ingress.manifest(model)
    policy = ingress.config.versions.get(model)
    known = ingress.versions.manifests.get(model, {}) if policy else {}
    entries = [VersionEntry(version=m.version, sha256=m.sha256, description=m.description,
                            test_accuracy=m.metrics.get("test_accuracy"))
               for m in (known.values() if policy else [ingress.manifest(model)])]
    report = VersionsReport(model=model, serving=await ingress.versions.serving_version(model) if policy
                            else ingress.manifest(model).version,
                            canary=policy.canary if policy else None, shadow=policy.shadow if policy else None,
                            versions=entries)
    return json_response(report.model_dump(mode="json"))


@router.get("/models/{model}/shadow", responses={
    200: success(ShadowReport, "Agreement of the shadow version with the serving one, latency of each, and a "
                 "sample of the inputs they disagree on"),
    **error_responses({404: "unknown_model, no_shadow: the profile runs no shadow version of this model",
                       503: "store_unavailable"})})
async def shadow_report(model: str, request: Request) -> Response:
    ingress = _ingress(request)
    ingress.manifest(model)
    policy = ingress.config.versions.get(model)
    if policy is None or policy.shadow is None:
        raise ApiError(404, "no_shadow", f"profile {ingress.config.profile!r} runs no shadow version of {model!r}")
    store = ShadowStore(ingress.results.client, ingress.settings.namespace, ingress.config.spec.result_ttl_s)
    try:
        tally = await store.tally(model)
        sample = await store.disagreements(model)
        serving = await ingress.versions.serving_version(model)
    except RedisError as exc:
        raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                       {"Retry-After": "1"}) from exc
    report = ShadowReport(
        model=model, serve_version=serving, shadow_version=policy.shadow, jobs=tally.jobs, agreed=tally.agreed,
        agreement_rate=round(tally.agreed / tally.jobs, 6) if tally.jobs else None, rows=tally.rows,
        rows_agreed=tally.rows_agreed,
        latency=VersionLatency(serve_ms=_mean_ms(tally.serve_seconds, tally.jobs),
                               shadow_ms=_mean_ms(tally.shadow_seconds, tally.jobs)),
        disagreements=sample)
    return json_response(report.model_dump(mode="json"))
