"""Model outputs as answers: pure functions from ONNX Runtime's arrays to ``RowPrediction``s."""

from __future__ import annotations

import numpy as np

from toposerve.brokers import RowPrediction


def to_row_predictions(
    class_indices: np.ndarray, probabilities: np.ndarray, labels: list[str]
) -> list[RowPrediction]:
    """Pure: model outputs -> one ``RowPrediction`` per row, probabilities rounded to 6 places."""
    rounded = np.round(probabilities.astype(np.float64), 6).tolist()
    return [
        RowPrediction(label=labels[int(index)], class_index=int(index), probabilities=row)
        for index, row in zip(class_indices.tolist(), rounded, strict=True)
    ]
