"""The cluster files in jobs/ and the Dockerfile, checked without a cluster: the RayJob against KubeRay's
own CRD schema, the runtime_env and the image against pyproject.toml."""

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CRD = REPO.parent / "shared" / "data" / "kuberay" / "ray.io_rayjobs.yaml"
# What Ray's cluster images already have; the runtime_env installs the rest of our dependencies.
IN_RAY_IMAGES = {"ray", "torch", "pyarrow", "fsspec", "numpy"}


def strict(schema):
    """The schema with unknown fields refused (Kubernetes would prune them silently, so a misspelt
    field would be ignored): every object with properties gets additionalProperties: false."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayjob_schema():
    if not CRD.exists():
        pytest.skip(f"KubeRay's CRD is not beside the repository ({CRD})")
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB: C is 10x
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


def rayjob() -> dict:
    return yaml.safe_load((REPO / "jobs" / "rayjob.yaml").read_text())


def test_rayjob_satisfies_kuberays_schema(rayjob_schema):
    jsonschema.Draft7Validator(rayjob_schema).validate(rayjob())


@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda job: job["spec"].update(shutdownAfterJobFinish=True), "Additional properties"),
        (
            lambda job: job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
            "'name' is a required property",
        ),
        (lambda job: job["spec"].update(ttlSecondsAfterFinished="600"), "is not of type 'integer'"),
    ],
)
def test_the_schema_check_catches_what_kubectl_would(rayjob_schema, break_it, error):
    job = rayjob()
    break_it(job)
    with pytest.raises(jsonschema.ValidationError, match=error):
        jsonschema.Draft7Validator(rayjob_schema).validate(job)


def test_rayjob_runs_as_it_is():
    job = rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["serviceAccountName"], "bucket access comes from the service account"
        shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in pod["containers"][0]["volumeMounts"])
    for group in cluster["workerGroupSpecs"]:  # without the autoscaler, min and max must be the size
        assert (
            cluster.get("enableInTreeAutoscaling") or group["minReplicas"] == group["maxReplicas"] == group["replicas"]
        )
    assert cluster["authOptions"]["mode"] == "token"
    image = re.search(r"^FROM rayproject/ray:(\S+)-py311-gpu$", (REPO / "Dockerfile").read_text(), re.M)
    assert image and image.group(1) == cluster["rayVersion"]
    assert job["spec"]["entrypoint"].startswith("unclip-batch run ")  # installed in the image by the Dockerfile


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_runtime_env_installs_every_dependency_a_ray_image_lacks():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {_name(r) for r in project["dependencies"]} - IN_RAY_IMAGES
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert {_name(r) for r in env["pip"]} == needed
    pins = {_name(r): r for r in project["dependencies"]}
    for requirement in env["pip"]:  # the same version ranges as the package itself
        assert requirement.replace(" ", "") == pins[_name(requirement)].replace(" ", "").split(";")[0]
