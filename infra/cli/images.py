"""``vllm-fleet plan <images stack>``: the image plan (infra/plan/images.py ``plan_bake``), the
mocked resource tree checked by the policy pack, and the artifacts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from infra.config import ImagesStackConfig
from infra.plan.images import component_documents, image_plan_summary, plan_bake


def run_plan(config: ImagesStackConfig, out_dir: Path | None, as_json: bool) -> None:
    """``vllm-fleet plan <images stack>``: the image plan, the mocked resource tree, artifacts."""
    plan = plan_bake(config)
    # Pulumi only now: the program runs under in-process mocks, the offline preview.
    from infra.preview.offline import preview_resources, resource_tree_text, resources_json
    from infra.preview.policies import images_policy_config, require_pack_passes

    records = preview_resources(config, preview=True)
    # The same guardrails `pulumi preview --policy-pack` applies, with an image stack's config.
    pack_config = images_policy_config()
    require_pack_passes(records, pack_config)
    summary = image_plan_summary(plan)
    artifacts = {
        **component_documents(plan),
        "image-plan.json": json.dumps(summary, indent=2) + "\n",
        "resources.json": resources_json(records),
        "policy-config.json": json.dumps(pack_config, indent=2) + "\n",
    }
    target = out_dir or Path("build") / config.stack
    written = []
    for rel, content in sorted(artifacts.items()):
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    if as_json:
        doc = {"stack": config.stack, **summary, "resources": len(records), "artifacts": [str(p) for p in written]}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return

    out = Console(highlight=False)
    bake = config.bake
    out.print(f"[bold]Stack {config.stack}[/bold]: image {plan.spec.name} in {config.region}")
    decision = Table(title="Image", show_header=False, title_justify="left")
    decision.add_column("", style="bold", no_wrap=True)
    decision.add_column("", overflow="fold")
    decision.add_row("vLLM", f"{plan.pin.gpu_package}=={plan.pin.version} (infra/facts/data/vllm.yaml)")
    runtime = next(c.parameters for c in plan.components if c.key == "vllm-runtime")
    decision.add_row(
        "runtime",
        f"torch {runtime['TorchVersion']} (CUDA {runtime['CudaMajor']}), NVIDIA driver >= {runtime['MinDriverMajor']}, "
        f"Python >= {runtime['RequiresPython']}" + (f", Ray {runtime['RayVersion']}" if runtime["RayVersion"] else ""),
    )
    decision.add_row("base image", f"{plan.spec.base_image}: {summary['base_image']['description']}")
    decision.add_row("build instance", plan.spec.build_instance_type + (" (multi-node: Ray, EFA check)" if plan.spec.multi_node else ""))
    weights = plan.spec.weights
    decision.add_row(
        "weights",
        f"{weights.source}{'@' + weights.revision if weights.revision else ''} → /opt/models/{weights.model_name} "
        f"({weights.size_gib:g} GiB)"
        if weights is not None
        else "none (fleets download at boot)",
    )
    decision.add_row("prewarm", "yes: " + " ".join(plan.spec.prewarm.serve_args) if plan.spec.prewarm else "no")
    decision.add_row("root volume", f"base AMI's root snapshot + {plan.extra_root_gib} GiB")
    decision.add_row("schedule", bake.schedule or "none: builds when started")
    decision.add_row("build on deploy", "yes: `pulumi up` bakes one image (hours)" if bake.build_on_deploy else "no")
    out.print(decision)

    components = Table(title="Recipe components, in order", title_justify="left")
    for column in ("component", "version", "installs / checks", "scripts"):
        components.add_column(column, overflow="fold")
    for component in summary["components"]:
        components.add_row(
            component["key"], component["version"], component["installs"], "\n".join(component["scripts"])
        )
    out.print(components)
    out.file.flush()
    # Plain print: parameter names must stay whole (and greppable) at any terminal width.
    print(f"Base image parameter: {plan.base_image_ssm_parameter} (the recipe's parent, read at each build)")
    print(f"Publishes each new AMI id to SSM {plan.ami_ssm_parameter_name} ({plan.ami_ssm_parameter_data_type})")
    print(f"Fleet stacks use it as vllm-fleet:image.ssmParameter: {plan.ami_ssm_parameter_name}", flush=True)
    out.print(f"\n[bold]Resources[/bold] ({len(records)}; what `pulumi up` would create, from the mocked run):")
    out.file.flush()
    # Plain print: the tree's lines must not be wrapped at the terminal width.
    print(resource_tree_text(records), flush=True)
    out.print(f"Artifacts written to {target}/:")
    for path in written:
        out.print(f"  {path.relative_to(target)}")
