"""Ranks leave together: the first rank to finish waited for nobody and tore the process group (and rank 0's TCP
store) down while another rank was still finishing; that rank could then abort after its work was done
("terminate called without an active exception", seen once in CI)."""
import json
import os
import subprocess
import sys
import textwrap

from pathlib import Path

from sft_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

RANK = textwrap.dedent("""
    import atexit, json, os, sys, time
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    # registered before the strategy's own exit handler, so it runs after it (atexit is last in, first out)
    atexit.register(lambda: open(f"{out}/left{rank}", "w").write(json.dumps(time.time())))
    from training.config import DeepSpeedArgs, OptimArgs
    from training.engine.strategy import Strategy
    Strategy(DeepSpeedArgs(), OptimArgs(), "fp32")
    if rank == 1:
        time.sleep(3)  # still finishing its work
        open(f"{out}/done1", "w").write(json.dumps(time.time()))
""")


def _two_ranks(script: str, tmp_path) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def test_ranks_wait_for_each_other_at_exit(tmp_path):
    procs = _two_ranks(RANK, tmp_path)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done1 = json.loads((tmp_path / "done1").read_text())
    left0 = json.loads((tmp_path / "left0").read_text())
    assert left0 >= done1, (left0, done1)  # rank 0 left only after rank 1 had finished


FAILING = textwrap.dedent("""
    import atexit, json, os, sys, time
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    atexit.register(lambda: open(f"{out}/left{rank}", "w").write(json.dumps(time.time())))
    from training.config import DeepSpeedArgs, OptimArgs
    from training.engine.loop import run_stage
    from training.engine.strategy import Strategy

    def main():
        Strategy(DeepSpeedArgs(), OptimArgs(), "fp32")
        if rank == 1:
            raise SystemExit("data.json: row 3: field 'chosen' is missing")  # as a stage stops on bad input
        time.sleep(8)  # rank 0 is still working (in a real run: waiting in a collective for rank 1)
        open(f"{out}/done0", "w").write(json.dumps(time.time()))
        return {}

    run_stage(main)
""")


def test_a_rank_stopping_on_an_error_leaves_at_once(tmp_path):
    """Before, a rank that stopped with SystemExit(message) waited in its exit handler for the other ranks (up to
    two minutes); the launcher only stops the others once one rank has exited."""
    procs = _two_ranks(FAILING, tmp_path)
    try:
        out1 = procs[1].communicate(timeout=300)[0]
    finally:
        procs[0].kill()  # as the launcher does once a rank has failed
        procs[0].communicate()
    assert procs[1].returncode == 1 and "row 3: field 'chosen' is missing" in out1, out1
    left1, done0 = json.loads((tmp_path / "left1").read_text()), tmp_path / "done0"
    assert not done0.exists() or left1 < json.loads(done0.read_text()), out1  # it did not wait for rank 0
