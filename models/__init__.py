"""The model layer: manifests and the sha256-checked registry, input preprocessing, the tensor codec.

Pure where it can be; used by the stages, the ingress and the producers without any stage code.
The ONNX files themselves are data in deploy/models/.
"""

from toposerve.models.items import DirectorySource, ItemSource, RedisSource, check_item_id, item_key
from toposerve.models.outputs import to_row_predictions
from toposerve.models.preprocessing import (
    InputError,
    InputLimits,
    check_features,
    check_image_header,
    derived_features,
    image_b64_to_features,
    image_to_features,
    open_image,
    rows_to_features,
)
from toposerve.models.registry import (
    ImagePreprocessing,
    LoadedModel,
    Manifest,
    ModelLoadError,
    ModelManifest,
    ModelRegistry,
    file_sha256,
    load_manifests,
    open_model,
)
from toposerve.models.tensors import TensorError, decode_tensor, encode_tensor
from toposerve.models.versions import (
    collect_versions,
    read_version_manifest,
    signature_problems,
    version_file_name,
    version_manifest_paths,
)

__all__ = [
    "DirectorySource",
    "ImagePreprocessing",
    "InputError",
    "InputLimits",
    "ItemSource",
    "LoadedModel",
    "Manifest",
    "ModelLoadError",
    "ModelManifest",
    "ModelRegistry",
    "RedisSource",
    "TensorError",
    "collect_versions",
    "open_model",
    "read_version_manifest",
    "signature_problems",
    "version_file_name",
    "version_manifest_paths",
    "check_features",
    "check_image_header",
    "check_item_id",
    "decode_tensor",
    "derived_features",
    "encode_tensor",
    "file_sha256",
    "image_b64_to_features",
    "image_to_features",
    "item_key",
    "load_manifests",
    "open_image",
    "rows_to_features",
    "to_row_predictions",
]
