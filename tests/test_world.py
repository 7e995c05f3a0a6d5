"""The embedded world: deterministic, self-consistent, in the formats the readers accept."""
import hashlib
import json

from training.data.bad_rows import BadRowReport
from training.data.formats import read_preferences, read_prompts, read_sft
from training.model.tiny import build_tokenizer
from training.world.generate import WorldConfig, generate
from training.world.scenes import KINDS, describe, facts, sample_scene

SMALL = dict(n_sft=60, n_pref=30, n_ppo=10, n_heldout=12)


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "world.json":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_world_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, WorldConfig(seed=3, **SMALL))
    generate(b, WorldConfig(seed=3, **SMALL))
    generate(c, WorldConfig(seed=4, **SMALL))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_a_world_regenerated_in_place_has_its_own_images(tmp_path):
    """Scene ids repeat across seeds (heldout00000...): a world written over another must not keep the old
    images beside its new ground truth (they were kept when the file existed)."""
    generate(tmp_path / "w", WorldConfig(seed=3, **SMALL))
    generate(tmp_path / "w", WorldConfig(seed=4, **SMALL))
    generate(tmp_path / "fresh", WorldConfig(seed=4, **SMALL))
    assert _digest(tmp_path / "w") == _digest(tmp_path / "fresh")


def test_a_generation_stopped_part_way_leaves_no_world_record(tmp_path, monkeypatch):
    """world.json, which ensure_world reads to reuse a world, stayed the old world's while a regeneration with another
    seed (stopped after its images) had rewritten the images: the mixed folder was reused without a word."""
    import training.world.generate as gen
    small = dict(n_sft=4, n_pref=2, n_ppo=2, n_heldout=2)
    generate(tmp_path, WorldConfig(seed=0, **small))
    assert (tmp_path / "world.json").exists()

    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(gen, "_sft_rows", stopped)  # the images written, nothing else
    try:
        generate(tmp_path, WorldConfig(seed=1, **small))
    except KeyboardInterrupt:
        pass
    assert not (tmp_path / "world.json").exists()  # so ensure_world generates the world it asks for anew


def test_a_world_made_by_other_generator_code_is_made_again(tmp_path):
    """ensure_world reused a world whose settings matched unless someone bumped VERSION by hand: after a change to
    the generator's code without the bump, every stage trained on the old world. Here a copy of the project whose
    generator words its description question otherwise must make the world again."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    code = tmp_path / "code"
    shutil.copytree(Path(__file__).parents[1] / "training", code / "training",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import sys, training.world.generate as g; W = g.WorldConfig; "
              "g.WorldConfig = lambda seed=0: W(seed=seed, n_sft=4, n_pref=2, n_ppo=2, n_heldout=2); "
              "g.ensure_world(sys.argv[1])")
    world = tmp_path / "world"

    def ensure():
        subprocess.run([sys.executable, "-c", script, str(world)], cwd=code, check=True,
                       env={**os.environ, "PYTHONPATH": str(code)})
    ensure()
    before = _digest(world)
    source = code / "training" / "world" / "generate.py"
    assert '"Describe the image in detail."' in source.read_text()
    source.write_text(source.read_text().replace('"Describe the image in detail."', '"Describe the image."'))
    ensure()
    assert _digest(world) != before
    assert "Describe the image." in (world / "sft_train.json").read_text()


def test_files_read_back_with_ground_truth(tmp_path):
    meta = generate(tmp_path, WorldConfig(seed=1, **SMALL))
    img = str(tmp_path / "images")
    sft = read_sft([str(tmp_path / "sft_train.json")], img, BadRowReport())
    prefs = read_preferences([str(tmp_path / "preference_train.json")], img, BadRowReport())
    prompts = read_prompts([str(tmp_path / "ppo_prompts.json")], img, BadRowReport())
    assert len(sft) == 2 * SMALL["n_sft"] and len(prefs) == SMALL["n_pref"] and len(prompts) == SMALL["n_ppo"]
    scenes = {s["id"]: s for s in meta["scenes"]["pref"]}
    for p in prefs:
        truth = {o["kind"] for o in scenes[p.id]["objects"]}
        chosen, rejected = p.responses
        assert chosen != rejected and p.facts
        assert all(f"no {k}" in " ".join(p.facts) for k in KINDS if k not in truth)
    # the benchmark's ground truth equals the scene's kinds
    held = {s["id"]: s for s in meta["scenes"]["heldout"]}
    for line in (tmp_path / "bench_objhal.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert set(r["gt_objects"]) == {o["kind"] for o in held[r["question_id"]]["objects"]}


def test_hallucination_share_is_the_configured_rate(tmp_path):
    meta = generate(tmp_path, WorldConfig(seed=2, n_sft=1000, n_pref=2, n_ppo=2, n_heldout=2, hallucination_rate=0.2))
    share = meta["n_sft_descriptions_hallucinated"] / 1000
    assert 0.15 < share < 0.25
    # and each such description really names a kind that is not in its scene
    scenes = {s["id"]: {o["kind"] for o in s["objects"]} for s in meta["scenes"]["sft"]}
    rows = json.loads((tmp_path / "sft_train.json").read_text())
    from eval.embedded import mentioned_kinds
    n_bad = sum(bool(set(mentioned_kinds(r["conversations"][1]["value"])) - scenes[r["id"].split("-")[0]])
                for r in rows if r["id"].endswith("-describe"))
    assert n_bad == meta["n_sft_descriptions_hallucinated"]


def test_tokenizer_covers_every_word_of_the_world(tmp_path):
    generate(tmp_path, WorldConfig(seed=5, **SMALL))
    tok = build_tokenizer()
    texts = []
    for name in ("sft_train.json", "preference_train.json", "ranked_train.json"):
        for r in json.loads((tmp_path / name).read_text()):
            for t in r["conversations"]:
                v = t["value"]
                texts += v if isinstance(v, list) else [v.replace("<image>", "")]
            texts += r.get("facts", [])
    for t in texts:
        assert tok.unk_token_id not in tok(t)["input_ids"], t


def test_description_and_facts_of_a_scene():
    import random
    s = sample_scene(random.Random(0), "x")
    d = describe(s)
    for k in s.kinds:
        assert k in d
    assert len(facts(s)) == len(KINDS)


def test_rejected_answers_differ_from_chosen_only_in_their_error(tmp_path):
    """No text-only shortcut: kinds appear in one fixed order in chosen and rejected alike, and a
    wrong count keeps the colour list (only the number word changes)."""
    from eval.embedded import mentioned_kinds
    generate(tmp_path, WorldConfig(seed=9, **SMALL))
    n_count = 0
    for r in json.loads((tmp_path / "preference_train.json").read_text()):
        chosen, rejected = r["conversations"][-1]["value"]
        for text in (chosen, rejected):
            ks = mentioned_kinds(text)
            assert ks == sorted(ks, key=KINDS.index), text
        if mentioned_kinds(chosen) == mentioned_kinds(rejected):  # a wrong-count pair
            n_count += 1
            diff = [(a, b) for a, b in zip(chosen.split(), rejected.split()) if a != b]
            assert len(chosen.split()) == len(rejected.split()) and 1 <= len(diff) <= 2, (chosen, rejected)
    assert n_count > 0


def test_qa_turns_come_in_both_orders(tmp_path):
    """Benchmarks ask a counting or an existence question first; SFT must have seen both first."""
    generate(tmp_path, WorldConfig(seed=3, **SMALL))
    rows = [r for r in json.loads((tmp_path / "sft_train.json").read_text()) if r["id"].endswith("-qa")]
    firsts = {r["conversations"][0]["value"].split("\n")[1].split()[0] for r in rows}
    assert firsts == {"Is", "How"}
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in rows)


def test_a_wrong_count_never_falls_below_the_colours_it_lists():
    """Three squares of three colours miscounted as "two squares (red, green and blue)": the text alone gave the
    error away (a third of the colours had no object), in 31 of the default world's 2000 DPO pairs."""
    import random

    from training.world.generate import _wrong_count
    from training.world.scenes import Obj, Scene
    s = Scene("x", "white", tuple(Obj("square", c, 6, 10 + 20 * i, 10) for i, c in enumerate(("red", "blue", "green"))))
    wrong = {_wrong_count(s, random.Random(i)) for i in range(20)}
    assert wrong == {"The image shows four squares (red, green and blue) on a white background."}


def test_pope_adversarial_negatives_co_occur_most_with_the_positives(tmp_path):
    """POPE's adversarial split: for each positive in turn, the absent kind that co-occurs with it most often
    in the images asked about, as POPE counts it (they were counted in the SFT scenes). The negatives after the
    absent partners were the most frequent kinds instead: a scene holding a circle and a square (partners) was asked
    about the two commonest kinds, whatever their co-occurrence with circles and squares."""
    from collections import Counter
    meta = generate(tmp_path, WorldConfig(seed=0, n_sft=1000, n_pref=2, n_ppo=2, n_heldout=60))
    kinds = {n: [sorted({o["kind"] for o in s["objects"]}, key=KINDS.index) for s in sc]
             for n, sc in meta["scenes"].items()}
    co = Counter((a, b) for ks in kinds["heldout"] for a in ks for b in ks if a != b)
    rows = [json.loads(x) for x in (tmp_path / "bench_pope_adversarial.jsonl").read_text().splitlines()]
    for s, pos in zip(meta["scenes"]["heldout"], kinds["heldout"]):
        neg = [r["object"] for r in rows if r["image"] == f"{s['id']}.png" and r["label"] == "no"]
        absent = [k for k in KINDS if k not in pos]
        assert len(neg) == len(pos)
        for i, (p, k) in enumerate(zip(pos, neg)):
            assert co[(p, k)] == max(co[(p, x)] for x in absent if x not in neg[:i]), (pos, neg)


def test_pope_popular_negatives_are_the_commonest_absent_kinds_of_the_images_asked_about(tmp_path):
    """POPE's popular split ranks the kinds by how many of the images it asks about hold them (they were counted in
    the SFT scenes, another sample)."""
    from collections import Counter
    meta = generate(tmp_path, WorldConfig(seed=1, n_sft=50, n_pref=2, n_ppo=2, n_heldout=40))
    kinds = [sorted({o["kind"] for o in s["objects"]}, key=KINDS.index) for s in meta["scenes"]["heldout"]]
    freq = Counter(k for ks in kinds for k in ks)
    rows = [json.loads(x) for x in (tmp_path / "bench_pope_popular.jsonl").read_text().splitlines()]
    for s, pos in zip(meta["scenes"]["heldout"], kinds):
        neg = [r["object"] for r in rows if r["image"] == f"{s['id']}.png" and r["label"] == "no"]
        absent = sorted((k for k in KINDS if k not in pos), key=lambda k: (-freq[k], KINDS.index(k)))
        assert neg == absent[:len(pos[:3])], (pos, neg)


def test_the_sft_answers_and_the_count_benchmark_state_each_scenes_truth(tmp_path):
    """Only the descriptions were checked against the scenes: existence answers all "Yes", a count of at least one
    for every kind, or "There are one circles." passed every test. Each answer is checked here against its scene."""
    from eval.embedded import first_number
    from training.world.scenes import PLURAL
    meta = generate(tmp_path, WorldConfig(seed=4, **SMALL))
    kinds = {s["id"]: [o["kind"] for o in s["objects"]] for part in ("sft", "heldout") for s in meta["scenes"][part]}
    of_plural = {p: k for k, p in PLURAL.items()}
    seen = {"Yes": 0, "No": 0, 1: 0, 2: 0}
    for r in json.loads((tmp_path / "sft_train.json").read_text()):
        objs, turns = kinds[r["id"].rsplit("-", 1)[0]], r["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            words, answer = q["value"].removeprefix("<image>\n").split(), a["value"]
            if words[:3] == ["Is", "there", "a"]:
                kind = words[3]
                assert answer == (f"Yes, there is a {kind}." if kind in objs else f"No, there is no {kind}."), r
                seen[answer.split(",")[0]] += 1
            elif words[:2] == ["How", "many"]:
                kind, n = of_plural[words[2]], objs.count(of_plural[words[2]])
                assert first_number(answer) == n >= 1, r
                assert answer.startswith("There is ") and answer.endswith(f" {kind}.") if n == 1 else \
                    answer.startswith("There are ") and answer.endswith(f" {words[2]}."), r
                seen[min(n, 2)] += 1
    assert min(seen.values()) > 0  # both answers, one object and several
    for line in (tmp_path / "bench_count.jsonl").read_text().splitlines():
        q = json.loads(line)
        assert q["count"] == kinds[q["question_id"].removesuffix("-count")].count(q["object"]) >= 1
