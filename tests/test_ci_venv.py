"""scripts/ci_venv.sh (sourced by .ci/run): an environment put in memory (/dev/shm) is removed when its run ends, one
that a killed run left is removed by the next run, one whose run is alive is kept, and a machine with room neither on
disk nor in memory is told so before anything installs (a CI run once stalled for 90 minutes: two environments that
earlier runs left in /dev/shm had taken 12.6 GB of its memory)."""
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ci_venv.sh"


def bash(script, cwd, shm, **env):
    env = {**os.environ, "CI_SHM_DIR": str(shm), **env}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {SCRIPT}; {script}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_environments_of_ended_runs_are_removed_and_a_live_runs_kept(tmp_path):
    shm = tmp_path / "shm"
    for name in ["vlm_align_venv.ended", "vlm_align_venv.alive", "someone_else.x"]:
        (shm / name / "bin").mkdir(parents=True)
    (shm / "vlm_align_venv.ended" / ".lock").touch()  # a lock file that no process holds
    # flock holds the lock itself (-o: not its command, which would hold it past flock's end)
    holder = subprocess.Popen(["flock", "-o", str(shm / "vlm_align_venv.alive" / ".lock"), "sleep", "60"])
    try:
        for _ in range(100):  # until flock holds it
            if subprocess.run(["flock", "-n", str(shm / "vlm_align_venv.alive" / ".lock"), "true"]).returncode:
                break
            time.sleep(0.05)
        p = bash("ci_sweep_stale_venvs", tmp_path, shm)
        assert p.returncode == 0, p.stderr
        assert sorted(d.name for d in shm.iterdir()) == ["someone_else.x", "vlm_align_venv.alive"]
        assert "vlm_align_venv.ended" in p.stderr and "alive" not in p.stderr
    finally:
        holder.kill()
        holder.wait()
    assert bash("ci_sweep_stale_venvs", tmp_path, shm).returncode == 0
    assert sorted(d.name for d in shm.iterdir()) == ["someone_else.x"]


def test_an_environment_in_memory_lives_as_long_as_its_run(tmp_path):
    shm, clone = tmp_path / "shm", tmp_path / "clone"
    shm.mkdir()
    clone.mkdir()
    # the run places its environment, another run's sweep (without the first's descriptors) leaves it, the run ends
    p = bash(f"ci_place_venv; readlink .venv; bash -c 'source {SCRIPT}; ci_sweep_stale_venvs' 9>&-; "
             "ls -d \"$CI_VENV\"", clone, shm, CI_VENV_IN_SHM="1", CI_VENV_NEED_GB="0", CI_TESTS_NEED_GB="0")
    assert p.returncode == 0, p.stderr
    link, listed = p.stdout.split()
    assert Path(link).parent == shm and Path(link).name.startswith("vlm_align_venv.") and listed == link
    assert "CI_VENV_IN_SHM=1: the environment goes to" in p.stderr and "(memory), removed when this run ends" in p.stderr
    assert "removing" not in p.stderr
    assert list(shm.iterdir()) == [] and not os.path.lexists(clone / ".venv")


def test_a_disk_with_room_keeps_the_environment(tmp_path):
    shm, clone = tmp_path / "shm", tmp_path / "clone"
    shm.mkdir()
    clone.mkdir()
    p = bash("ci_place_venv", clone, shm, CI_VENV_NEED_GB="0")
    assert p.returncode == 0, p.stderr
    assert list(shm.iterdir()) == [] and not os.path.lexists(clone / ".venv")


def test_no_room_on_disk_or_in_memory_is_said_before_any_install(tmp_path):
    shm, clone = tmp_path / "shm", tmp_path / "clone"
    shm.mkdir()
    clone.mkdir()
    p = bash("ci_place_venv; echo installed", clone, shm, CI_VENV_IN_SHM="1", CI_VENV_NEED_GB="1",
             CI_TESTS_NEED_GB="100000")
    assert p.returncode == 1 and "installed" not in p.stdout
    assert "no room for the virtual environment" in p.stderr and "the tests 100000 GB of memory" in p.stderr
    assert list(shm.iterdir()) == [] and not os.path.lexists(clone / ".venv")
