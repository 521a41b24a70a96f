"""``--backend ray``: packs run as Ray tasks on a local Ray instance with 2 workers, the driver writes
the one store, and the results equal those of the local backend."""

from __future__ import annotations

import pytest

from flora.cli import main
from study.support import smoke_args, stored_trials

ray = pytest.importorskip("ray")

WHEN = ("run", "started", "finished", "wall_s", "heartbeat", "progress")


@pytest.mark.ray
def test_the_ray_backend_equals_the_local_backend(tiny_dir, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(smoke_args(tiny_dir, local)) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.cluster_resources()["CPU"] == 2
        assert main([*smoke_args(tiny_dir, remote), "--backend", "ray", "--set", "run.num_cpus=1"]) == 0
    finally:
        ray.shutdown()
    expected, got = stored_trials(local), stored_trials(remote)
    assert set(got) == set(expected) and {r["status"] for r in got.values()} == {"done"}
    for trial_id, row in expected.items():
        assert {k: v for k, v in got[trial_id].items() if k not in WHEN} == {
            k: v for k, v in row.items() if k not in WHEN
        }
    assert (remote / "report.md").is_file()
