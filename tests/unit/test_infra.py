"""infra/ stays runnable: every YAML parses and has what its tool requires,
every sluiceway command in it is one the CLI accepts (flags included),
every `ray start` parses with Ray's own CLI, and every image, Dockerfile
and path it names exists in the repository."""

import pathlib
import re
import shlex

import pytest
import yaml

from sluiceway.jobs.cli import build_parser

REPO = pathlib.Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
IMAGE = "sluiceway:0.1.0"


def load(name):
    return yaml.safe_load((INFRA / name).read_text())


def commands(node) -> list[str]:
    """Every string in a YAML document that runs sluiceway or `ray start`,
    split at shell separators into single commands."""
    found = []
    if isinstance(node, dict):
        for value in node.values():
            found += commands(value)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node) and node[0] in ("sluiceway", "ray"):
            found.append(shlex.join(node))  # an exec-form command list
        else:
            for value in node:
                found += commands(value)
    elif isinstance(node, str):
        for part in re.split(r"\s*(?:&&|;|\|\|)\s*", node):
            if re.match(r"(sluiceway [a-z-]+|ray start)( |$)", part.strip()):
                found.append(part.strip())
    return found


def sluiceway_argv(command: str) -> list[str]:
    return shlex.split(command)[1:]


def check_command(command: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "sluiceway":
        parser = build_parser()
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"the CLI refuses {command!r} (exit {exc.code})")
        with pytest.raises(SystemExit) as help_exit:  # and its --help works
            parser.parse_args([argv[1], "--help"])
        assert help_exit.value.code == 0
    else:
        from ray.scripts.scripts import start

        start.make_context("start", [a for a in argv[2:] if "$" not in a and not a.startswith("--autoscaling-config")])


def repo_path(path: str) -> pathlib.Path:
    """A path as the files name it: /app/... in the image is the repository."""
    return REPO / path.removeprefix("/app/").removeprefix("~/sluiceway/")


def job_files(command: str) -> list[str]:
    return [a for a in shlex.split(command) if a.endswith(".py")]


def test_every_infra_yaml_parses():
    files = sorted(INFRA.rglob("*.yml")) + sorted(INFRA.rglob("*.yaml"))
    assert len(files) == 4, files
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


def test_the_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray-cluster.yaml")
    validate_config(prepare_config(config))
    assert config["available_node_types"]["worker"]["min_workers"] < config["available_node_types"]["worker"]["max_workers"]
    for local in config["file_mounts"].values():
        assert (REPO / local).exists(), local
    submitted = [c for c in commands(config) if c.startswith("sluiceway submit")]
    assert submitted and all("s3://" in c for c in submitted)


def test_kuberay_manifests_have_what_the_operator_needs():
    cluster = load("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == IMAGE and spec["rayVersion"] == __import__("ray").__version__
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"] == IMAGE
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == IMAGE
    assert job["spec"]["entrypoint"].startswith("sluiceway submit ") and "s3://" in job["spec"]["entrypoint"]


def test_compose_builds_the_image_the_manifests_name():
    compose = load("docker-compose.yml")
    services = compose["services"]
    assert {"minio", "buckets", "ray-head", "ray-worker", "submit"} <= set(services)
    for name in ("ray-head", "ray-worker", "submit"):
        service = services[name]
        assert service["image"] == IMAGE
        assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == INFRA / "Dockerfile"
        assert service["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "s3://sluiceway/" in shlex.join(services["submit"]["command"])
    assert "mb -p local/sluiceway" in services["buckets"]["entrypoint"][-1]


def test_the_dockerfile_copies_files_that_exist_and_is_tagged_as_used():
    text = (INFRA / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
    assert f"-t {IMAGE} ." in text
    version = re.search(r'^version = "(.*)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert IMAGE.endswith(version)


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "docker-compose.yml", "kuberay/raycluster.yaml",
                                  "kuberay/rayjob.yaml"])
def test_commands_in_infra_are_commands_the_clis_accept(name):
    found = commands(load(name))
    if name != "kuberay/raycluster.yaml":  # KubeRay writes its own `ray start` from rayStartParams
        assert found, f"{name} runs no command"
    for command in found:
        check_command(command)
        for job in job_files(command):
            assert repo_path(job).is_file(), f"{name}: {job} is not a file of the repository"


def test_the_dockerfile_default_command_is_accepted():
    cmd = re.search(r"^CMD (\[.*\])$", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    argv = yaml.safe_load(cmd)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv[1:])
    assert exit_.value.code == 0
