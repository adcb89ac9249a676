"""The Open Inference Protocol over gRPC: KServe v2's ``GRPCInferenceService`` on a port of its own
(``TOPOSERVE_GRPC_PORT``), in the ingress process, on the same ``Ingress`` as REST.

The messages and the service stub are tritonclient's generated ones (``tritonclient.grpc``,
a superset of KServe v2), not a copy of the .proto. A ``ModelInfer`` request is turned into
the REST protocol's JSON form (and Triton's binary tensor data, which is what gRPC's
``raw_input_contents`` holds), then read by the same codec (api/oip_codec.py) and answered
by the same code as ``POST /v2/models/{m}/infer`` (api/oip_routes.py ``infer_answer``). So
every check and message is the REST one; failures are gRPC status codes
(``INVALID_ARGUMENT`` for a request the codec refuses, with its message).

Sync profiles answer with the outputs (``raw_output_contents``, as Triton sends them). Async
profiles accept the job(s) and answer at once with no outputs and the job ids in the
response's ``parameters`` (``job_id``, and ``job_ids`` comma-separated for several images),
to be read at ``GET /v1/jobs/{id}`` or its events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from toposerve.api.errors import ApiError
from toposerve.api.ingress import Ingress
from toposerve.api.oip_codec import (
    SERVER_NAME,
    OipError,
    image_text,
    input_name,
    model_metadata,
    parse_infer_call,
    read_model_input,
)
from toposerve.api.oip_routes import infer_answer, input_jobs, oip_manifest, oip_ready

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
    503: grpc.StatusCode.UNAVAILABLE, 502: grpc.StatusCode.UNAVAILABLE, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Where each datatype's values are in an InferTensorContents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def request_as_json(request: service_pb2.ModelInferRequest) -> tuple[dict, bytes | None]:
    """A gRPC infer request -> the REST protocol's JSON request and its binary tensor data (pure)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise OipError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            entry["parameters"] = {"binary_data_size": len(raw[index])}
        else:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            values = list(getattr(tensor.contents, field)) if field else []
            entry["data"] = [image_text(v) for v in values] if tensor.datatype == "BYTES" else values
        inputs.append(entry)
    data: dict = {"inputs": inputs}
    if request.id:
        data["id"] = request.id
    if request.outputs:
        data["outputs"] = [{"name": output.name} for output in request.outputs]
    timeout = request.parameters.get("timeout")
    if timeout is not None and timeout.WhichOneof("parameter_choice") == "int64_param":
        data["parameters"] = {"timeout": timeout.int64_param}
    return data, b"".join(raw) if raw else None


def _raw(tensor: dict) -> bytes:
    if tensor["datatype"] == "BYTES":
        serialized = serialize_byte_tensor(np.array([str(v).encode() for v in tensor["data"]], dtype=np.object_))
        return serialized.item() if serialized.size > 0 else b""  # one bytes object, as tritonclient sends it
    dtype = np.float32 if tensor["datatype"] == "FP32" else np.int64
    return np.asarray(tensor["data"], dtype=dtype).tobytes()


def answer_as_grpc(answer: dict) -> service_pb2.ModelInferResponse:
    """The REST protocol's answer -> a gRPC infer response, outputs as raw contents (pure)."""
    response = service_pb2.ModelInferResponse(model_name=answer["model_name"], model_version=answer["model_version"],
                                              id=answer["id"])
    for tensor in answer["outputs"]:
        response.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        response.raw_output_contents.append(_raw(tensor))
    for key, value in (answer.get("parameters") or {}).items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
        else:
            response.parameters[key].string_param = str(value)
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The six calls of KServe v2's service; anything else tritonclient's service has is UNIMPLEMENTED."""

    def __init__(self, current_ingress: Callable[[], Ingress]) -> None:
        # Looked up per call: a live profile swap replaces the app's Ingress (api/live_profile.py).
        self.current_ingress = current_ingress

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, OipError):
            await context.abort(_STATUS_CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), exc.message)
        if isinstance(exc, ApiError):
            await context.abort(_STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        log.exception("unhandled error in a gRPC inference call", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's method names
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=await oip_ready(self.current_ingress()))

    async def ModelReady(self, request, context):  # noqa: N802
        ingress = self.current_ingress()
        try:
            manifest = oip_manifest(ingress, request.name, request.version or None)
        except (OipError, ApiError) as exc:
            await self._refuse(context, exc)
        return service_pb2.ModelReadyResponse(ready=await oip_ready(ingress, manifest.name))

    async def ServerMetadata(self, request, context):  # noqa: N802
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version="0.1.0", extensions=[])

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            manifest = oip_manifest(self.current_ingress(), request.name, request.version or None)
        except (OipError, ApiError) as exc:
            await self._refuse(context, exc)
        described = model_metadata(manifest)
        response = service_pb2.ModelMetadataResponse(name=described["name"], versions=described["versions"],
                                                     platform=described["platform"])
        for kind in ("inputs", "outputs"):
            for tensor in described[kind]:
                getattr(response, kind).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    async def ModelInfer(self, request, context):  # noqa: N802
        ingress = self.current_ingress()
        try:
            with ingress.admission():
                manifest = oip_manifest(ingress, request.model_name, request.model_version or None)
                data, binary = request_as_json(request)
                call = parse_infer_call(data)
                model_input = read_model_input(call, manifest, binary, ingress.settings.max_rows)
                version = request.model_version or None
                if ingress.config.mode == "async":
                    return await self._accept(ingress, manifest, call.id, model_input, version)
                return answer_as_grpc(await infer_answer(ingress, manifest, call, model_input, version))
        except (OipError, ApiError) as exc:
            await self._refuse(context, exc)

    @staticmethod
    async def _accept(ingress: Ingress, manifest, request_id: str | None, model_input,
                      version: str | None) -> service_pb2.ModelInferResponse:
        """An async profile: the jobs accepted, their ids in the parameters, no outputs."""
        jobs = input_jobs(ingress, manifest, model_input.rows, model_input.images, input_name(manifest))
        for job in jobs:
            await ingress.versions.route(job, version)
            await ingress.submit_async(job)
        ids = [str(job.id) for job in jobs]
        response = service_pb2.ModelInferResponse(model_name=manifest.name, model_version=manifest.version,
                                                  id=request_id or ids[0])
        response.parameters["job_id"].string_param = ids[0]
        response.parameters["job_ids"].string_param = ",".join(ids)
        return response


async def start_grpc_server(current_ingress: Callable[[], Ingress], host: str, port: int) -> grpc.aio.Server:
    """The service on ``host:port``, started; ``await server.stop(grace)`` ends it."""
    ingress = current_ingress()
    max_bytes = ingress.settings.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_bytes),
                                      ("grpc.max_send_message_length", max(max_bytes, 16 * 1024 * 1024))])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(current_ingress), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"gRPC: cannot listen on {host}:{port}")
    await server.start()
    return server
