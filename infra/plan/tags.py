"""The tags every fleet resource carries, and the plan id they pin.

Tags are passed explicitly to every resource (not through a stack transform) so that what
the tests and the offline plan see under mocks — where transforms never run — is exactly
what AWS gets, and so the policy pack can check them on each resource.
"""

from __future__ import annotations

import hashlib
import json

from infra.plan.stack import StackPlan

STACK_TAG = "vllm-fleet:stack"
MODEL_TAG = "vllm-fleet:model"
QUANTIZATION_TAG = "vllm-fleet:quantization"
PLAN_ID_TAG = "vllm-fleet:plan-id"
REQUIRED_TAG_KEYS = (STACK_TAG, MODEL_TAG, QUANTIZATION_TAG, PLAN_ID_TAG)
# An image-build stack has no model or plan: its resources carry the stack and the image.
IMAGE_TAG = "vllm-fleet:image"
IMAGES_REQUIRED_TAG_KEYS = (STACK_TAG, IMAGE_TAG)

# Which part of the fleet a resource is; the policy pack keys its network rules on it.
ROLE_TAG = "vllm-fleet:role"
# On each launch template and its instances: the ladder type it was planned for.
INSTANCE_TYPE_TAG = "vllm-fleet:instance-type"
# Instance tags a node reads through instance metadata (launch templates enable it).
GANG_TAG = "vllm-fleet:gang"
TARGET_GROUP_TAG = "vllm-fleet:target-group-arn"
WEIGHTS_URI_TAG = "vllm-fleet:weights-uri"
LOG_GROUP_TAG = "vllm-fleet:log-group"

# EC2 tag values: at most 256 characters.
TAG_VALUE_MAX = 256


def plan_id(stack_plan: StackPlan) -> str:
    """12 hex digits of the plan summary's hash: changes exactly when the sizing changes."""
    summary = json.dumps(stack_plan.plan.summary().as_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(summary.encode()).hexdigest()[:12]


def stack_tags(stack_plan: StackPlan) -> dict[str, str]:
    """The stack's own tags (stack file ``vllm-fleet:tags``) plus the four required ones."""
    config = stack_plan.config
    tags = dict(config.tags)
    tags.update(
        {
            STACK_TAG: config.stack,
            MODEL_TAG: stack_plan.plan.request.model_name,
            QUANTIZATION_TAG: stack_plan.plan.request.quantization,
            PLAN_ID_TAG: plan_id(stack_plan),
        }
    )
    return tags
