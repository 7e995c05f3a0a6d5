"""benchmarks.ppo_sweeps: reading the sweep rows, the rule that chose PPO's defaults, the table and the figure; and
the repository's rows against benchmarks/results_history.md."""
import re
from pathlib import Path

import pytest

from benchmarks.ppo_sweeps import ROOT, choose, main, read_sweeps

HEADER = "sweep,setting,seed,chair_i,recall\n"


def write(tmp_path, body: str) -> Path:
    p = tmp_path / "s.csv"
    p.write_text(HEADER + body)
    return p


def test_rule_and_table_hand_worked(tmp_path, capsys):
    # SFT 0.100 / 0.950: CHAIR_i <= 0.05 and recall >= 0.92
    csv = write(tmp_path, "1,a,1,0.040,0.900\n1,a,2,0.045,0.925\n1,a,3,0.060,0.940\n"  # mean 0.0483 / 0.9217: eligible
                          "1,b,1,0.070,0.960\n1,b,2,0.040,0.960\n1,b,3,0.050,0.910\n"  # mean 0.0533: over half SFT's
                          "2,c,1,0.010,0.990\n"                                       # best, but one seed
                          "2,d,1,0.030,0.910\n2,d,2,0.030,0.905\n2,d,3,0.030,0.900\n")  # eligible, lower recall
    settings = read_sweeps(csv)
    assert [s.name for s in settings] == ["a", "b", "c", "d"]
    assert settings[0].mean == pytest.approx((0.145 / 3, 2.765 / 3))
    assert choose(settings, 0.1, 0.5, 3).name == "a"
    assert choose(settings, 0.1, 0.5, 1).name == "c"
    assert choose(settings, 0.1, 0.2, 3) is None
    out_png = tmp_path / "f.png"
    res = main(["--csv", str(csv), "--sft", "0.1", "0.95", "--out", str(out_png)])
    out = capsys.readouterr().out
    assert res["chosen"].name == "a" and out_png.stat().st_size > 10_000
    assert "targets CHAIR_i <= 0.0500, recall >= 0.920" in out
    assert "| 1 | a **(rule's choice)** | 3 | 0.048 | 0.922 | 1 of 3 |" in out  # seed 2 alone inside both
    assert "| 1 | b | 3 | 0.053 | 0.943 | 1 of 3 |" in out
    assert "| 2 | d | 3 | 0.030 | 0.905 | 0 of 3 |" in out


@pytest.mark.parametrize("body, said", [
    ("1,a,1,0.04,x\n", "line 2, field recall: 'x' is not a float"),
    ("1,a,1,0.04,0.9\n1,a,1.5,0.04,0.9\n", "line 3, field seed: '1.5' is not a int"),
    ("1,a,1,1.2,0.9\n", "line 2, field chair_i: 1.2 is outside [0.0, 1.0]"),
    ("1,a,1,0.04,0.9\n1,a,1,0.05,0.9\n", "line 3, field seed: seed 1 of 'a' is there twice"),
    ("1,,1,0.04,0.9\n", "line 2, field setting: empty"),
    ("1,a,1,0.04\n", "line 2, field recall: None is not a float"),
])
def test_bad_rows_named(tmp_path, body, said):
    csv = write(tmp_path, body)
    with pytest.raises(ValueError, match=re.escape(f"{csv}: {said}")):
        read_sweeps(csv)


def test_bad_header(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("setting,seed,chair,recall\na,1,0.1,0.9\n")
    with pytest.raises(ValueError, match="the header must be sweep,setting,seed,chair_i,recall"):
        read_sweeps(p)


def test_repository_rows_are_the_written_ones_and_choose_the_defaults():
    """Every row of benchmarks/ppo_sweeps.csv is in results_history.md's "PPO sweeps" section as written there, and
    the rule picks the setting marked as the defaults (a sweep row that beat them without the defaults moving fails)."""
    settings = read_sweeps(ROOT / "benchmarks" / "ppo_sweeps.csv")
    history = (ROOT / "benchmarks" / "results_history.md").read_text()
    section = " ".join(history[history.index("## PPO sweeps"):].split())  # figures wrap across lines
    for s in settings:
        for c, r in s.points:
            assert f"{c:.3f} / {r:.3f}" in section, (s.name, c, r)
    assert choose(settings, 0.109, 0.5, 3).name.endswith("(defaults)")
