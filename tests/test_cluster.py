"""The cluster definitions parse and say what matters: they install this project, run its
command, keep the dashboard on loopback, and have the GPUs the configs they run ask for."""
import re
import tomllib
from pathlib import Path

import yaml

from ensemble.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d for d in deps if "==" in d and not d.startswith("ray")}


def test_ray_up_cluster():
    spec = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    types = spec["available_node_types"]
    head = types[spec["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = [t for n, t in types.items() if n != spec["head_node_type"]]
    assert all(w["min_workers"] == 0 < w["max_workers"] for w in workers)  # autoscaling
    assert all(float(w["resources"]["GPU"]).is_integer() for w in workers)
    assert any("pip install" in c and "ensemble" in c for c in spec["setup_commands"])
    head_start = " ".join(spec["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # the job it documents runs a config whose GPU requests a worker can hold
    config = re.search(r"ensemble\.cli run (\S+)", (CLUSTER / "ray-cluster.yaml").read_text())
    most = max(w["resources"]["GPU"] for w in workers)
    for key, res in load_config(ROOT / config.group(1)).model_resources():
        assert res.num_gpus <= most, key


def test_rayjob_runs_the_project_image():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["ensemble", "run"] and "--address" in entry
    config = ROOT / Path(entry[2]).relative_to("/app")
    cfg = load_config(config)
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    images = {c["image"] for c in head["template"]["spec"]["containers"]}
    gpus = []
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            images.add(c["image"])
            gpus.append(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)))
    assert images == {"ensemble:0.1.0"}
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "ensemble:0.1.0" in dockerfile and re.search(r"pip install .*/app", dockerfile)
    assert cluster["rayVersion"] == "2.58.0" and "FROM rayproject/ray:2.58.0" in dockerfile
    for key, res in cfg.model_resources():
        assert res.num_gpus <= max(gpus), key
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_runtime_env_pins_what_the_project_pins():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert pins() <= set(env["pip"])
    assert {"runs/", ".venv/"} <= set(env["excludes"])
