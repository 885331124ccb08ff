"""docs/cluster.md works as written: every job command parses with the job's own argparse parser, the
cluster's inputs, outputs and models are on S3, and the AWS set-up creates what cluster.yaml names."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "cluster.md").read_text()
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
LOCATION_FLAGS = ("--input", "--output", "--model", "--init", "--tokens", "--data", "--val-data", "--val-tokens")


def shell_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands, continuation lines joined, heredoc bodies left out, split as the shell does."""
    out, lines = [], iter(block.replace("\\\n", " ").splitlines())
    for line in lines:
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(shlex.split(line, comments=True))
    return out


def python_m(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) of a `python -m MODULE ...` command (also after `ray job submit ... --`)."""
    for i in range(len(argv) - 2):
        if argv[i] == "python" and argv[i + 1] == "-m":
            return argv[i + 2], argv[i + 3:]
    return None


def inline_commands() -> list[tuple[str, list[str]]]:
    """Commands quoted in the prose: `python -m benchmarks.x ...`, `flextok <job> ...` (without `...`)."""
    found = []
    prose = re.sub(r"```.*?```", "", DOC, flags=re.S).replace("\n", " ")
    for span in re.findall(r"`([^`]+)`", prose):
        if "..." in span or not span.startswith(("python -m ", "flextok ")):
            continue
        argv = shlex.split(span)
        if len(argv) < 3:
            continue
        if argv[:2] == ["python", "-m"]:
            found.append((argv[2], argv[3:]))
        elif argv[0] == "flextok":
            from jobs.cli import COMMANDS

            found.append((COMMANDS[argv[1]][0], argv[2:]))
    return found


def job_commands() -> list[tuple[str, list[str]]]:
    cmds = [python_m(argv) for block in shell_blocks() for argv in commands(block)]
    return [c for c in cmds if c is not None] + inline_commands()


def test_the_docs_name_the_jobs_they_show():
    modules = {m for m, _ in job_commands()}
    assert {"jobs.tokenize", "jobs.train_generator", "jobs.train_tokenizer", "benchmarks.memory_plan",
            "jobs.sample"} <= modules


@pytest.mark.parametrize("module, argv", job_commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_documented_command_parses(module, argv):
    args = importlib.import_module(module).build_parser().parse_args(argv)  # SystemExit on any bad flag
    if module.startswith("jobs.train_"):
        assert args.workers >= 1
    for flag in LOCATION_FLAGS:  # on a cluster every location is one every node can reach
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        assert value is None or value.startswith("s3://"), f"{module} {flag} {value}"


def test_cluster_jobs_fit_the_cluster():
    tokenize = next(argv for m, argv in job_commands() if m == "jobs.tokenize")
    args = importlib.import_module("jobs.tokenize").build_parser().parse_args(tokenize)
    workers = CLUSTER["available_node_types"]["gpu_worker"]
    assert args.gpus_per_actor == 1 and args.actors <= workers["max_workers"]  # one GPU per g5.4xlarge
    assert "/mnt/" not in DOC  # no node has such a folder: models come from S3


def test_the_aws_setup_creates_the_profiles_cluster_yaml_names():
    setup = next(b for b in shell_blocks() if "create-instance-profile" in b)
    loop = re.search(r"for ROLE in ([\w\- ]+); do", setup).group(1).split()
    named = {t["node_config"]["IamInstanceProfile"]["Name"] for t in CLUSTER["available_node_types"].values()}
    assert named == set(loop)
    worker = CLUSTER["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"]
    # The head passes the worker role on: the PassRole policy names it.
    policies = {}
    for name, body in re.findall(r"cat > ([\w\-.]+) <<'?JSON'?\n(.*?)\nJSON", setup, flags=re.S):
        policies[name] = json.loads(body.replace("$BUCKET", "my-bucket").replace("$ACCOUNT", "123456789012"))
    assert {"ec2-trust.json", "flextok-s3.json", "flextok-pass-worker.json"} <= set(policies)
    assert policies["flextok-pass-worker.json"]["Statement"][0]["Resource"].endswith(f":role/{worker}")
    actions = {a for s in policies["flextok-s3.json"]["Statement"] for a in s["Action"]}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    # The AMI look-up in the docs is the parameter cluster.yaml resolves.
    parameter = re.search(r"--name (\S+)", next(b for b in shell_blocks() if "ssm get-parameter" in b)).group(1)
    images = {t["node_config"]["ImageId"] for t in CLUSTER["available_node_types"].values()}
    assert images == {f"resolve:ssm:{parameter}"}
