"""The policy pack's entry point; the policies themselves live (and are tested) in infra/preview/policies.py."""

from pulumi_policy import EnforcementLevel, PolicyPack

from infra.preview.policies import PACK_NAME, POLICIES

PolicyPack(name=PACK_NAME, policies=list(POLICIES), enforcement_level=EnforcementLevel.MANDATORY)
