import psutil

from secure_mor.federation import run_local_simulation

FLOWER_OR_RAY = ("flower-superlink", "flower-superexec", "flwr-", "raylet", "gcs_server", "ray::")


def _flower_and_ray_processes() -> set[int]:
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(marker in cmdline for marker in FLOWER_OR_RAY):
            found.add(process.info["pid"])
    return found


def test_flower_app_runs_on_the_simulation_runtime_and_leaves_no_process():
    before = _flower_and_ray_processes()
    result = run_local_simulation({"num-clients": 3, "data-skew": 0.8, "seed": 0}, num_supernodes=3, timeout=600)
    assert result.status == "finished:completed"
    for k in range(3):
        assert f"client-{k} " in result.logs
    assert "'pairs': 800" in result.logs
    assert _flower_and_ray_processes() <= before
