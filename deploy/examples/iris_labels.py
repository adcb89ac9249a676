"""A post-processing stage, as a user writes one: the business's names for iris species, and
a review flag when the model is unsure.

Wired in by deploy/profiles/post_processing.yaml between predict (which publishes
``scored.<model>`` there) and the store:

    labels:
      kind: custom
      handler: toposerve.deploy.examples.iris_labels:handle
      consumes: ["scored.*"]

Whatever it returns is published as ``prediction.<model>``, the job's answer; a sync caller
gets it too. Confirms, retries, dead letters, deadlines and metrics come from toposerve.
"""

from toposerve.brokers import Prediction

# What the shop calls each species the model knows.
DISPLAY_NAMES = {
    "setosa": "Iris setosa (bristle-pointed iris)",
    "versicolor": "Iris versicolor (blue flag)",
    "virginica": "Iris virginica (Virginia iris)",
}
# Below this top probability a person looks at the flower.
REVIEW_BELOW = 0.6
NEEDS_REVIEW = "needs review"


def business_label(label: str | None, top_probability: float) -> str | None:
    if label is None:
        return None
    if top_probability < REVIEW_BELOW:
        return NEEDS_REVIEW
    return DISPLAY_NAMES.get(label, label)


async def handle(message: Prediction) -> Prediction:
    rows = [row.model_copy(update={"label": business_label(row.label, max(p or 0.0 for p in row.probabilities))})
            for row in message.rows]
    return message.model_copy(update={"rows": rows})
