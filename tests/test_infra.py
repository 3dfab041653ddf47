"""The deploy material parses and agrees with the code: images, KubeRay manifests, Dagster Helm
values and the compose deployment."""
import re
import tomllib
from pathlib import Path

import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAY_AUTH_SECRET = "m2fd-ray-auth"


def _ray_auth(env: list[dict]) -> tuple:
    """(RAY_AUTH_MODE, the Secret and key RAY_AUTH_TOKEN comes from) of a container's env list."""
    by = {e["name"]: e for e in env}
    ref = by["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    return by["RAY_AUTH_MODE"]["value"], ref["name"], ref["key"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__  # the images carry the Ray the code was tested with
    # token auth on every node from one Secret (the drivers read the same one: dagster/values.yaml)
    assert spec["authOptions"] == {"mode": "token", "secretName": RAY_AUTH_SECRET}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    gpu, cpu = groups["gpu-workers"], groups["cpu-workers"]
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    for g in (cpu, gpu):
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (c,) = _containers(g["template"])
        lim = c["resources"]["limits"]
        assert int(g["rayStartParams"]["num-cpus"]) <= int(lim["cpu"])
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/data" in mounts
        vols = {v["name"] for v in g["template"]["spec"]["volumes"]}
        assert {m["name"] for m in c["volumeMounts"]} <= vols
    assert _containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cuda" in _containers(gpu["template"])[0]["image"]
    assert "cpu" in _containers(cpu["template"])[0]["image"]


def test_raycluster_has_cpu_and_gpu_worker_groups():
    docs = _docs(INFRA / "kuberay" / "raycluster.yaml")
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(rc["spec"])
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims == {"m2fd-data", "m2fd-models"}
    pvc = next(d for d in docs if d.get("metadata", {}).get("name") == "m2fd-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod writes the same dataset directory


def test_rayjob_runs_the_cli_with_valid_config_keys():
    (job,) = _docs(INFRA / "kuberay" / "rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    argv = job["spec"]["entrypoint"].split()
    assert argv[:2] == ["m2fd", "run"] and "--out" in argv
    from pipelines.cli import _load_config

    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    _load_config(None, sets)  # every --set names a real config key


def test_dagster_helm_values_serve_our_definitions():
    v = yaml.safe_load((INFRA / "dagster" / "values.yaml").read_text())
    (dep,) = v["dagster-user-deployments"]["deployments"]
    assert dep["dagsterApiGrpcArgs"] == ["-m", "pipelines.dagster_defs"]
    env = {e["name"]: e["value"] for e in dep["env"] if "value" in e}
    # the code location and every run's pod are Ray drivers: the cluster's auth mode and token (KubeRay's
    # authOptions Secret keeps the token under auth_token)
    for e in (dep["env"], v["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["env"]):
        assert _ray_auth(e) == ("token", RAY_AUTH_SECRET, "auth_token")
    assert env["M2FD_OUT"].startswith("/data/") and env["RAY_ADDRESS"].startswith("ray://m2fd-head-svc")
    assert v["postgresql"]["enabled"] is True
    assert v["runLauncher"]["type"] == "K8sRunLauncher"
    # the head service the values point at is the one KubeRay creates for the RayCluster
    rc = next(d for d in _docs(INFRA / "kuberay" / "raycluster.yaml") if d["kind"] == "RayCluster")
    assert env["RAY_ADDRESS"] == f"ray://{rc['metadata']['name']}-head-svc:10001"
    import importlib

    mod = importlib.import_module(dep["dagsterApiGrpcArgs"][1])
    assert mod.defs.resolve_job_def("m2fd_job")


def test_compose_deployment_uses_postgres_and_the_code_location():
    c = yaml.safe_load((INFRA / "compose.yaml").read_text())
    assert {"postgres", "code", "webserver", "daemon"} <= set(c["services"])
    assert "pipelines.dagster_defs" in c["services"]["code"]["command"]
    inst = yaml.safe_load((INFRA / "dagster" / "dagster.yaml").read_text())
    assert "postgres" in inst["storage"]
    ws = yaml.safe_load((INFRA / "dagster" / "workspace.yaml").read_text())
    port = ws["load_from"][0]["grpc_server"]["port"]
    assert str(port) in c["services"]["code"]["command"]
    assert (INFRA / c["services"]["code"]["build"]["context"] / c["services"]["code"]["build"]["dockerfile"]).is_file()


def test_dockerfiles_copy_what_exists_and_install_with_setup():
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (INFRA / name).read_text()
        assert re.search(r"^FROM \S+", text, re.M)
        assert "scripts/setup.sh" in text and "ffmpeg" in text and "espeak-ng" in text
        assert not re.search(r"^ENTRYPOINT", text, re.M)  # KubeRay and Dagster set the container command
    cuda = (INFRA / "Dockerfile.cuda").read_text()
    assert "torch.version.cuda" in cuda
    # NVDEC in the GPU image: PyNvVideoCodec from the gpu extra, and the driver's video library mounted
    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert gpu == ["pynvvideocodec==2.2.4"] and re.search(r"M2FD_EXTRAS=dev,gpu bash scripts/setup\.sh", cuda)
    assert 'install -q -e ".[$EXTRAS]"' in setup and "EXTRAS=${M2FD_EXTRAS:-dev}" in setup
    caps = re.search(r"NVIDIA_DRIVER_CAPABILITIES=(\S+)", cuda)
    assert caps and {"compute", "utility", "video"} <= set(caps.group(1).split(","))
    assert (REPO / "scripts" / "setup.sh").is_file()
