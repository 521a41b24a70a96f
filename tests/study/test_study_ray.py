"""``--backend ray``: packs run as Ray tasks on a local Ray instance with 2 workers, the driver writes
the one store, and the results (rows, instance scores, curves) equal those of the local backend."""

from __future__ import annotations

import pytest

from flora.cli import main
from study.support import smoke_args, stored_results

ray = pytest.importorskip("ray")


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
    expected, got = stored_results(local), stored_results(remote)
    assert set(got) == set(expected) and {r["status"] for r in got.values()} == {"done"}
    assert got == expected  # rows, per-instance scores and learning curves
    assert (remote / "report.md").is_file()
