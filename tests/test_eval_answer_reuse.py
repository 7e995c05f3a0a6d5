"""When eval.answers reuses a model's answers (the main job's evaluation of unchanged weights) and when it
generates them again."""
import json
from pathlib import Path

from eval import answers


def _fake_predict(monkeypatch):
    """training.predict's stand-in: answers each question with the bytes of its image file."""
    import training.predict.main as pm
    calls = []

    def predict(argv):
        opt = dict(zip(argv[::2], argv[1::2]))
        rows = [json.loads(x) for x in Path(opt["--data_path"]).read_text().splitlines()]
        with open(opt["--output_file"], "a") as f:
            for r in rows:
                text = (Path(opt["--image_folder"]) / r["image"]).read_text()
                f.write(json.dumps({"question_id": r["question_id"], "text": text}) + "\n")
        calls.append(len(rows))
    monkeypatch.setattr(pm, "parse", lambda argv: argv)
    monkeypatch.setattr(pm, "predict", predict)
    return calls


def _one_question(tmp_path):
    """(a model folder, an image folder holding s0.png, its answer "a cat", and a run() generating its answers)."""
    model, images = tmp_path / "model", tmp_path / "images"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    images.mkdir()
    (images / "s0.png").write_text("a cat")
    qs = {"objhal": [{"question_id": "s0", "image": "s0.png", "text": "Describe the image."}]}

    def run():
        got, _ = answers.generate(qs, tmp_path / "predictions", "embedded", str(model), str(images),
                                  {"num_beams": 1, "batch_size": 4}, [], restart=True)
        return got["objhal"]["s0"]
    return images, run


def test_answers_to_an_image_since_rewritten_are_generated_again(tmp_path, monkeypatch):
    """The settings held the image folder's name, not its pictures: a world generated anew (another seed or
    version: the same question ids, texts and file names, other scenes) kept the old answers, scored against
    the new scenes' objects."""
    calls = _fake_predict(monkeypatch)
    images, run = _one_question(tmp_path)
    assert run() == "a cat" and calls == [1]
    assert run() == "a cat" and calls == [1]  # unchanged: reused, no model loaded
    (images / "s0.png").write_text("a dog")
    assert run() == "a dog" and calls == [1, 1]


def test_answers_made_by_other_generation_code_are_generated_again(tmp_path, monkeypatch):
    """The settings held the model, decoding, questions and images but not the code that generates: after a change
    to training/predict (or a module it imports) run_pipeline.sh kept its unchanged stages and their answers made by
    the old code, beside a retrained stage's made by the new one, in one results table."""
    import shutil
    calls = _fake_predict(monkeypatch)
    code = tmp_path / "code"
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "training", code / "training", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(answers, "CODE_ROOT", code, raising=False)  # the project whose code generates
    _, run = _one_question(tmp_path)
    assert run() == "a cat" and run() == "a cat" and calls == [1]
    for name in ("training/predict/generate.py", "training/templates/chat.py"):  # imported by predict's main
        (code / name).write_text((code / name).read_text() + "\n# changed\n")
        run()
        assert len(calls) == 2 + (name != "training/predict/generate.py"), name
    (code / "training" / "ppo" / "trainer.py").write_text("# not reached by predict\n")
    run()
    assert len(calls) == 3
