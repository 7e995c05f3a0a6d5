"""Every published data format -> canonical records, field by field; every kind of bad row reported."""
import base64
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.data.bad_rows import BadRowError, BadRowReport
from training.data.formats import DataFormatError, read_preferences, read_prompts, read_sft, read_table, write_jsonl
from training.data.records import ConversationRecord, Message, PreferenceRecord, PromptRecord, RowRef


def _img_bytes(color=(255, 0, 0), fmt="PNG", size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


RED, GREEN = _img_bytes(), _img_bytes((0, 255, 0))


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "images"
    (r / "sub").mkdir(parents=True)
    (r / "a.jpg").write_bytes(_img_bytes(fmt="JPEG"))
    (r / "b.png").write_bytes(GREEN)
    (r / "sub" / "c.png").write_bytes(RED)
    (r / "truncated.png").write_bytes(_img_bytes(size=(64, 64))[:-40])
    (tmp_path / "outside.png").write_bytes(RED)
    os.symlink(tmp_path / "outside.png", r / "link_out.png")
    return r


def _json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def _msgs(*pairs):
    return [Message(role, text) for role, text in pairs]


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ---------------------------------------------------------------- containers

def test_read_table_containers(tmp_path):
    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert list(read_table(_json(tmp_path / "list.json", rows))) == list(enumerate(rows))
    assert list(read_table(_json(tmp_path / "cols.json", {"a": [1, 2], "b": ["x", "y"]}))) == list(enumerate(rows))
    (tmp_path / "lines.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert list(read_table(tmp_path / "lines.jsonl")) == [(0, rows[0]), (2, rows[1])]  # row = line - 1
    (tmp_path / "lines.json").write_text("\n".join(map(json.dumps, rows)))  # JSONL named .json (POPE does)
    assert list(read_table(tmp_path / "lines.json")) == list(enumerate(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    assert list(read_table(tmp_path / "t.parquet")) == list(enumerate(rows))


def test_read_table_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl: line 2: invalid JSON"):
        list(read_table(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_text('[{"a": 1},')
    with pytest.raises(DataFormatError, match=r"bad\.json: invalid JSON at line 1"):
        list(read_table(tmp_path / "bad.json"))
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(DataFormatError, match="expected a JSON list of rows or a dict of columns"):
        list(read_table(tmp_path / "scalar.json"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match=r"bad\.parquet: cannot read parquet"):
        list(read_table(tmp_path / "bad.parquet"))
    rows = [{"prompt": f"question {k} " * 8, "chosen": "a" * 40} for k in range(600)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "two_groups.parquet", row_group_size=300)
    meta = pq.ParquetFile(tmp_path / "two_groups.parquet").metadata
    data = bytearray((tmp_path / "two_groups.parquet").read_bytes())
    start = meta.row_group(1).column(0).data_page_offset
    data[start + 20:start + 200] = b"\xab" * 180  # the second row group's first page header and data
    (tmp_path / "damaged.parquet").write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match=r"damaged\.parquet: cannot read parquet rows from row 256 on \(600"):
        list(read_table(tmp_path / "damaged.parquet"))
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(DataFormatError, match="unknown file type '.csv'"):
        list(read_table(tmp_path / "x.csv"))
    with pytest.raises(DataFormatError, match="no such file"):
        list(read_table(tmp_path / "missing.json"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: no rows"):
        read_sft(str(tmp_path / "empty.jsonl"), None)


def test_hub_id_fails_loudly_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(DataFormatError, match="as a Hub dataset.*HF_HUB_OFFLINE"):
        list(read_table("no-such-owner-xyz/no-such-dataset-xyz"))


def test_saved_dataset_dict_and_folder_of_shards(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"id": "s0", "conversations": _turns("<image>\nQ?", "A.")}])
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert [r["id"] for _, r in read_table(tmp_path / "dd")] == ["s0"]
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist([{"id": f"q{k}", "text": "Is it red?"}]), shards / f"p{k}.parquet")
    assert [r.id for r in read_prompts(str(shards), None)] == ["q0", "q1"]


# ---------------------------------------------------------------- SFT

def test_llava_sft(tmp_path, root):
    path = _json(tmp_path / "llava.json", [
        {"id": "000000033471", "image": "a.jpg", "conversations": _turns("<image>\nWhat is it?", "A bus.")},
        {"id": "m", "image": "sub/c.png", "conversations": _turns("Describe it.\n<image>", "Red.", "More?", "No.")},
        {"id": "t", "conversations": _turns("Hello?", "Hi.")},
        {"id": "multi", "image": "a.jpg,b.png", "conversations": _turns("<image>\nCompare.", "Same.")},
        {"id": "noph", "image": "a.jpg", "conversations": _turns("What is it?", "A bus.")},
        {"image": ["a.jpg", "b.png"], "conversations": [{"from": "system", "value": "Be brief."},
                                                        *_turns("<image> vs <image>?", "Same.")]},
    ])
    recs = read_sft(path, str(root))
    assert all(isinstance(r, ConversationRecord) for r in recs) and len(recs) == 6
    a, b, c = str(root / "a.jpg"), str(root / "b.png"), str(root / "sub" / "c.png")
    r = recs[0]
    assert (r.id, r.images, r.source) == ("000000033471", [a], RowRef(path, 0))
    assert r.messages == _msgs(("user", "<image>\nWhat is it?"), ("assistant", "A bus."))
    assert recs[1].messages == _msgs(("user", "Describe it.\n<image>"), ("assistant", "Red."),
                                     ("user", "More?"), ("assistant", "No."))
    assert recs[1].images == [c]
    assert (recs[2].images, recs[2].messages[0].content) == ([], "Hello?")
    assert recs[3].images == [a, b]  # one placeholder for two images -> one each, in front
    assert recs[3].messages[0].content == "<image>\n<image>\nCompare."
    assert recs[4].messages[0].content == "<image>\nWhat is it?"
    assert recs[5].id == "llava-5" and recs[5].images == [a, b]
    assert recs[5].messages[0] == Message("system", "Be brief.")
    assert recs[5].messages[1].content == "<image> vs <image>?"  # as many as images: left where they are


def test_llava_image_root_defaults_to_data_folder(root):
    path = _json(root / "data.json", [{"image": "sub/c.png", "conversations": _turns("<image>\nQ", "A")}])
    assert read_sft(path, None)[0].images == [str(root / "sub" / "c.png")]
    with pytest.raises(BadRowError, match="path escapes the image root"):
        read_sft(_json(root / "d2.json", [{"image": "../outside.png", "conversations": _turns("Q", "A")}]), "")


def _trl_rows():
    return [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
         "images": [{"bytes": RED, "path": None}]},
        {"messages": [{"role": "system", "content": "Short answers."},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
         "images": []},
    ]


def _check_trl_sft(recs):
    assert len(recs) == 2
    assert recs[0].messages == _msgs(("user", "<image>\nWhat color?"), ("assistant", "Red."))
    assert recs[0].images == [RED]  # bytes sources keep the bytes
    assert recs[1].messages == _msgs(("system", "Short answers."), ("user", "Hi"), ("assistant", "Hello."))
    assert recs[1].images == []


def test_trl_messages_sft_json_parquet_and_saved(tmp_path, root):
    import datasets

    rows = _trl_rows()
    rows_b64 = [dict(r, images=[base64.b64encode(i["bytes"]).decode() for i in r["images"]]) for r in rows]
    _check_trl_sft(read_sft(_json(tmp_path / "trl.json", rows_b64), str(root)))
    write_jsonl(tmp_path / "trl.jsonl", rows_b64)
    _check_trl_sft(read_sft(str(tmp_path / "trl.jsonl"), str(root)))
    rows[1]["messages"] = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in rows[1]["messages"]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "trl.parquet")
    _check_trl_sft(read_sft(str(tmp_path / "trl.parquet"), str(root)))
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "trl_saved"))
    _check_trl_sft(read_sft(str(tmp_path / "trl_saved"), str(root)))


def test_sft_refuses_preference_file_listing_formats(tmp_path):
    path = _json(tmp_path / "pref.json", [{"conversations": _turns("Q", ["a", "b"])}])
    with pytest.raises(DataFormatError, match=r"(?s)match no known SFT format.*llava.*trl_messages.*preference data"):
        read_sft(path, None)
    with pytest.raises(DataFormatError, match=r"(?s)fields \['foo'\].*Known preference formats.*rlaif_v"):
        read_preferences(_json(tmp_path / "foo.json", [{"foo": 1}]), None)


# ---------------------------------------------------------------- preferences

def test_ranked_list_and_embedded_world(tmp_path, root):
    path = _json(tmp_path / "rm.json", [
        {"id": "000000013249", "image": "a.jpg",
         "conversations": _turns("What are they doing?\n<image>", ["best", "middle", "worst"])},
        {"id": "w1", "image": "b.png", "facts": ["a green square", "no text"],
         "conversations": _turns("<image>\nDescribe.", "A square.", "Color?", ["Green.", "Red."])},
    ])
    recs = read_preferences(path, str(root))
    assert all(isinstance(r, PreferenceRecord) for r in recs)
    r = recs[0]
    assert (r.id, r.responses, r.images, r.facts) == ("000000013249", ["best", "middle", "worst"],
                                                      [str(root / "a.jpg")], None)
    assert r.prompt == _msgs(("user", "What are they doing?\n<image>"))
    assert r.source == RowRef(path, 0)
    w = recs[1]
    assert w.prompt == _msgs(("user", "<image>\nDescribe."), ("assistant", "A square."), ("user", "Color?"))
    assert (w.responses, w.facts) == (["Green.", "Red."], ["a green square", "no text"])


def test_rlaif_v_parquet(tmp_path, root):
    row = {"ds_name": "RLAIF-V", "image": {"bytes": RED, "path": "x/1.jpg"}, "question": "What is red?",
           "chosen": "The square.", "rejected": "The dog.", "origin_dataset": "OK-VQA",
           "origin_split": json.dumps({"model": "m", "feedback_model": "f", "type": "question_answering"}),
           "idx": 7, "image_path": "x/1.jpg"}
    pq.write_table(pa.Table.from_pylist([row, dict(row, idx=8, image={"bytes": None, "path": "sub/c.png"})]),
                   tmp_path / "rlaif.parquet")
    recs = read_preferences(str(tmp_path / "rlaif.parquet"), str(root))
    assert recs[0].id == "7" and recs[0].prompt == _msgs(("user", "<image>\nWhat is red?"))
    assert (recs[0].responses, recs[0].images) == (["The square.", "The dog."], [RED])
    assert recs[1].images == [str(root / "sub" / "c.png")]  # no bytes: the path, resolved in the root


def test_vision_feedback_mix(tmp_path, root):
    import datasets

    conv = [{"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "preference_values": ["A red square.", "A blue circle."]}]
    rows = [{"id": "vf0", "origin_pre_dataset": "VLFeedback", "image": {"bytes": RED, "path": None},
             "image_path": "vf0.png", "conversations": json.dumps(conv)}]
    datasets.Dataset.from_list(rows, features=datasets.Features({
        "id": datasets.Value("string"), "origin_pre_dataset": datasets.Value("string"), "image": datasets.Image(),
        "image_path": datasets.Value("string"), "conversations": datasets.Value("string")})
    ).save_to_disk(str(tmp_path / "vf"))
    (r,) = read_preferences(str(tmp_path / "vf"), str(root))
    assert (r.id, r.prompt, r.responses, r.images) == (
        "vf0", _msgs(("user", "<image>\nWhat is shown?")), ["A red square.", "A blue circle."], [RED])


def test_llava_rlhf_with_captions_and_choice(tmp_path, root):
    captions = _json(tmp_path / "image_to_caption.json", {"a.jpg": ["A bus.", "A red bus."], "b": ["Green."]})
    path = _json(tmp_path / "llava_7b_v1_preference.json", [
        {"id": "p0", "image": "a.jpg", "conversations": _turns("<image>\nWhat is it?", "placeholder"),
         "output_1": {"from": "gpt", "value": "A car."}, "output_2": {"from": "gpt", "value": "A bus."},
         "preference": 2},
        {"id": "p1", "image": "b.png", "conversations": _turns("<image>\nColor? A. red B. green", None),
         "output_1": {"from": "gpt", "value": "B"}, "output_2": {"from": "gpt", "value": "A"},
         "preference": 1, "choices": ["red", "green"], "correct_choice_idx": 1},
    ])
    recs = read_preferences(path, str(root), captions_file=captions)
    assert recs[0].prompt == _msgs(("user", "<image>\nWhat is it?"))
    assert (recs[0].responses, recs[0].facts) == (["A bus.", "A car."], ["A bus.", "A red bus."])
    assert recs[1].responses == ["B", "A"]
    assert recs[1].facts == ["Green.", "correct answer: green"]  # captions found by file stem
    assert read_preferences(path, str(root))[0].facts is None  # no captions file: no facts


def test_trl_preference_saved(tmp_path, root):
    import datasets

    def msg(role, *parts):
        return {"role": role, "content": [{"type": t, "text": x} for t, x in parts]}

    rows = [{"images": [{"bytes": RED, "path": None}, {"bytes": GREEN, "path": None}],
             "prompt": [msg("user", ("image", None), ("image", None), ("text", "Which is red?"))],
             "chosen": [msg("assistant", ("text", "The first."))],
             "rejected": [msg("assistant", ("text", "The second."))], "facts": ["left is red"]}]
    msg_feature = datasets.List({"role": datasets.Value("string"), "content": datasets.List(
        {"type": datasets.Value("string"), "text": datasets.Value("string")})})
    datasets.Dataset.from_list(rows, features=datasets.Features({
        "images": datasets.List(datasets.Image()), "prompt": msg_feature, "chosen": msg_feature,
        "rejected": msg_feature, "facts": datasets.List(datasets.Value("string"))})).save_to_disk(str(tmp_path / "t"))
    (r,) = read_preferences(str(tmp_path / "t"), str(root))
    assert r.prompt == _msgs(("user", "<image>\n<image>\nWhich is red?"))
    assert (r.responses, r.images, r.facts) == (["The first.", "The second."], [RED, GREEN], ["left is red"])
    # TRL standard (text) format
    (s,) = read_preferences(_json(tmp_path / "std.json", [{"prompt": "Q?", "chosen": "a", "rejected": "b"}]), None)
    assert (s.prompt, s.responses, s.images) == (_msgs(("user", "Q?")), ["a", "b"], [])


def test_opa_dpo_saved(tmp_path, root):
    import datasets

    row = {"queries": "<image>\nDescribe the image.", "image_bytes": base64.b64encode(RED).decode(),
           "standard_response": "A red square.", "original_generate_response": "A red square and a dog.",
           "AI_pseudo_response": "A red square.", "AI_json_report": json.dumps([{"sentence": "...", "score": -1}])}
    datasets.Dataset.from_list([row, dict(row, image_bytes=GREEN)]).save_to_disk(str(tmp_path / "opa"))
    recs = read_preferences(str(tmp_path / "opa"), str(root))
    assert recs[0].prompt == _msgs(("user", "<image>\nDescribe the image."))
    assert (recs[0].responses, recs[0].images) == (["A red square.", "A red square and a dog."], [RED])
    assert recs[1].images == [GREEN]


# ---------------------------------------------------------------- prompts

def test_ppo_prompts_and_question_files(tmp_path, root):
    ppo = _json(tmp_path / "ppo.json", [
        {"id": "000000442786", "image": "a.jpg", "conversations": _turns("What happens?\n<image>", "A kite.")},
        {"id": "e", "image": "a.jpg", "conversations": _turns("<image>\nDescribe.", ""), "facts": ["a bus"]},
        {"id": "only", "image": "b.png", "conversations": _turns("<image>\nQ")},
    ])
    recs = read_prompts(ppo, str(root))
    assert all(isinstance(r, PromptRecord) for r in recs)
    assert recs[0].prompt == _msgs(("user", "What happens?\n<image>"))
    assert (recs[0].reference, recs[0].images, recs[0].facts) == ("A kite.", [str(root / "a.jpg")], None)
    assert (recs[1].reference, recs[1].facts) == (None, ["a bus"])  # an empty reference is no reference
    assert (recs[2].reference, recs[2].meta, recs[2].prompt_field) == (None, {}, "conversations")

    pope = tmp_path / "coco_pope_random.json"
    write_jsonl(pope, [{"question_id": 1, "image": "a.jpg", "text": "Is there a bus in the image?",
                        "label": "yes", "category": "random"}])
    (p,) = read_prompts(str(pope), str(root))
    assert (p.id, p.prompt, p.meta) == ("1", _msgs(("user", "<image>\nIs there a bus in the image?")),
                                        {"question_id": 1, "label": "yes", "category": "random"})
    assert p.prompt_field == "text"
    objhal = write_jsonl(tmp_path / "objhal.jsonl", [
        {"image_id": 42, "question": "Describe the image.", "image": base64.b64encode(RED).decode()}])
    (o,) = read_prompts(str(objhal), str(root))
    # image_id is no question id (several questions can ask about one image): the row index is, as in eval
    assert (o.id, o.images, o.meta, o.prompt_field) == ("0", [RED], {"image_id": 42}, "question")
    trl = _json(tmp_path / "trl_prompts.json", [{"prompt": [{"role": "user", "content": "Hi?"}], "images": []}])
    (t,) = read_prompts(trl, None)
    assert (t.prompt, t.prompt_field) == (_msgs(("user", "Hi?")), "prompt")


def test_prompt_rows_keep_their_multiple_choice_answer(tmp_path, root):
    """PPO's --correct_bonus reads the answer from a prompt's meta, in every prompt format: an answer
    field as given, A-OKVQA's choices + index as the option's letter."""
    rows = _json(tmp_path / "ppo.json", [
        {"id": "a", "image": "a.jpg", "conversations": _turns("<image>\nWhich? A. cat B. dog"), "correct_option": "B"},
        {"id": "b", "image": "a.jpg", "conversations": _turns("<image>\nWhich?"), "choices": ["x", "y", "z"],
         "correct_choice_idx": 2},
        {"id": "c", "image": "a.jpg", "conversations": _turns("<image>\nIs it red?"), "gt_answer": "No"},
    ])
    assert [r.meta for r in read_prompts(rows, str(root))] == [{"correct_option": "B"}, {"correct_option": "C"},
                                                               {"gt_answer": "No"}]
    trl = _json(tmp_path / "trl.json", [{"prompt": [{"role": "user", "content": "Hi?"}], "images": [],
                                         "correct_answer": "Yes"}])
    assert read_prompts(trl, None)[0].meta == {"correct_answer": "Yes"}
    bad = _json(tmp_path / "bad.json", [{"id": "b", "image": "a.jpg", "conversations": _turns("<image>\nQ"),
                                         "choices": ["x"], "correct_choice_idx": 3}])
    with pytest.raises(BadRowError, match="correct_choice_idx"):
        read_prompts(bad, str(root))


# ---------------------------------------------------------------- bad rows

GOOD_SFT = {"image": "a.jpg", "conversations": _turns("<image>\nQ", "A")}
GOOD_PREF = {"image": "a.jpg", "conversations": _turns("<image>\nQ", ["good", "bad"])}
GOOD_RLAIF = {"image": "a.jpg", "question": "Q", "chosen": "good", "rejected": "bad"}
GOOD_RLHF = {"image": "a.jpg", "conversations": _turns("<image>\nQ", "x"), "output_1": "a", "output_2": "b",
             "preference": 1}
GOOD_TRL = {"images": [], "prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}
GOOD_MSGS = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
GOOD_VF = {"image": "a.jpg", "conversations": json.dumps([{"from": "human", "value": "<image>\nQ"},
                                                          {"from": "gpt", "preference_values": ["a", "b"]}])}
GOOD_OPA = {"queries": "<image>\nQ", "image_bytes": base64.b64encode(RED).decode(), "AI_pseudo_response": "a",
            "original_generate_response": "b"}
GOOD_Q = {"question_id": 1, "image": "a.jpg", "text": "Q"}
GOOD_PPO = {"image": "a.jpg", "conversations": _turns("<image>\nQ")}
B64_TRUNCATED = base64.b64encode(_img_bytes(size=(64, 64))[:-40]).decode()

BAD_ROWS = {
    "missing image file": (read_sft, GOOD_SFT, dict(GOOD_SFT, image="nope.jpg"), "image", "file not found"),
    "truncated image": (read_sft, GOOD_SFT, dict(GOOD_SFT, image="truncated.png"), "image", "cannot decode image"),
    "dotdot escape": (read_sft, GOOD_SFT, dict(GOOD_SFT, image="../outside.png"), "image", "path escapes"),
    "absolute outside": (read_sft, GOOD_SFT, dict(GOOD_SFT, image="ABS_OUTSIDE"), "image", "path escapes"),
    "symlink outside": (read_sft, GOOD_SFT, dict(GOOD_SFT, image="link_out.png"), "image", "path escapes"),
    "second of two images": (read_sft, GOOD_SFT, dict(GOOD_SFT, image="a.jpg,nope.png"), "image[1]", "file not found"),
    "not alternating": (read_sft, GOOD_SFT, dict(GOOD_SFT, conversations=[{"from": "human", "value": "<image>\nQ"},
                        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A"}]),
                        "conversations[1].from", "must alternate human/gpt"),
    "wrong role": (read_sft, GOOD_SFT, dict(GOOD_SFT, conversations=[{"from": "human", "value": "<image>\nQ"},
                   {"from": "bot", "value": "A"}]), "conversations[1].from", "unknown speaker 'bot'"),
    "missing value": (read_sft, GOOD_SFT, dict(GOOD_SFT, conversations=[{"from": "human", "value": "<image>\nQ"},
                      {"from": "gpt"}]), "conversations[1].value", "missing value"),
    "empty response": (read_sft, GOOD_SFT, dict(GOOD_SFT, conversations=_turns("<image>\nQ", "  ")),
                       "conversations[1].value", "empty response"),
    "ends with human": (read_sft, GOOD_SFT, dict(GOOD_SFT, conversations=_turns("<image>\nQ", "A", "Q2")),
                        "conversations[2].from", "no response"),
    "placeholder, no image": (read_sft, GOOD_SFT, {"conversations": _turns("<image>\nQ", "A")},
                              "conversations", "has no image"),
    "too many placeholders": (read_sft, GOOD_SFT, dict(GOOD_SFT, conversations=_turns("<image><image>Q", "A")),
                              "conversations", "2 '<image>' placeholders for 1 image"),
    "placeholder in response": (read_sft, GOOD_SFT, dict(GOOD_SFT, conversations=_turns("Q", "<image>")),
                                "conversations[1]", "outside the user text"),
    "row not an object": (read_sft, GOOD_SFT, ["not", "a", "row"], "<row>", "not an object"),
    "row a number": (read_sft, GOOD_SFT, 3, "<row>", "row is a int, not an object"),
    # The format is detected from the first row: a later row of another format lacks the fields it needs.
    "llava row lacks conversations": (read_sft, GOOD_SFT, GOOD_MSGS, "conversations", "missing field"),
    "llava conversations null": (read_sft, GOOD_SFT, dict(GOOD_SFT, conversations=None), "conversations",
                                 "expected a non-empty list of turns"),
    "trl row lacks messages": (read_sft, GOOD_MSGS, GOOD_SFT, "messages", "missing field"),
    "trl messages a text": (read_sft, GOOD_MSGS, {"messages": "Q"}, "messages", "no assistant response"),
    "ranked list of one": (read_preferences, GOOD_PREF, dict(GOOD_PREF, conversations=_turns("Q", ["only"])),
                           "conversations[1].value", "needs at least 2"),
    "ranked value not a list": (read_preferences, GOOD_PREF, dict(GOOD_PREF, conversations=_turns("Q", "one")),
                                "conversations[1].value", "expected a ranked list"),
    "identical ranked": (read_preferences, GOOD_PREF, dict(GOOD_PREF, conversations=_turns("Q", ["x", "x "])),
                         "conversations[1].value", "identical"),
    "empty in ranked list": (read_preferences, GOOD_PREF, dict(GOOD_PREF, conversations=_turns("Q", ["x", ""])),
                             "conversations[1].value[1]", "empty response"),
    "no user message": (read_preferences, GOOD_PREF, dict(GOOD_PREF, conversations=[{"from": "gpt",
                        "value": ["a", "b"]}]), "conversations", "no human message"),
    "facts not strings": (read_preferences, GOOD_PREF, dict(GOOD_PREF, facts=[1, 2]), "facts", "list of strings"),
    "rlaif identical": (read_preferences, GOOD_RLAIF, dict(GOOD_RLAIF, rejected="good"), "chosen/rejected",
                        "identical"),
    "rlaif truncated base64": (read_preferences, GOOD_RLAIF, dict(GOOD_RLAIF, image=B64_TRUNCATED), "image",
                               "cannot decode image"),
    "rlaif empty chosen": (read_preferences, GOOD_RLAIF, dict(GOOD_RLAIF, chosen=""), "chosen/rejected[0]",
                           "empty response"),
    "rlhf preference 3": (read_preferences, GOOD_RLHF, dict(GOOD_RLHF, preference=3), "preference",
                          "expected 1 or 2"),
    "rlhf missing output": (read_preferences, GOOD_RLHF, dict(GOOD_RLHF, output_2=None), "output_2",
                            "missing value"),
    "rlhf choice index out of range": (read_preferences, GOOD_RLHF,
                                       dict(GOOD_RLHF, choices=["a"], correct_choice_idx=3),
                                       "correct_choice_idx", "not an index into choices"),
    "trl two chosen messages": (read_preferences, GOOD_TRL, dict(GOOD_TRL, chosen=[
        {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "c"}]), "chosen",
        "exactly one assistant message"),
    "trl prompt ends with assistant": (read_preferences, GOOD_TRL, dict(GOOD_TRL, prompt=[
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]), "prompt[1].role",
        "must end with a user turn"),
    "trl row lacks prompt": (read_preferences, GOOD_TRL, {"chosen": "a", "rejected": "b"}, "prompt",
                             "missing field"),
    "rlhf row lacks conversations": (read_preferences, GOOD_RLHF, {k: v for k, v in GOOD_RLHF.items()
                                     if k != "conversations"}, "conversations", "missing field"),
    "opa identical": (read_preferences, GOOD_OPA, dict(GOOD_OPA, AI_pseudo_response="b"),
                      "AI_pseudo_response/original_generate_response", "identical"),
    "feedback mix bad json": (read_preferences, GOOD_VF, dict(GOOD_VF, conversations="[{"), "conversations",
                              "not valid JSON text"),
    "question image missing": (read_prompts, GOOD_Q, dict(GOOD_Q, image="nope.jpg"), "image", "file not found"),
    "question only url": (read_prompts, GOOD_Q, {"question_id": 2, "text": "Q", "image_src": "https://x/y.jpg"},
                          "image_src", "only an image URL"),
    "question row lacks question": (read_prompts, GOOD_Q, {"question_id": 3, "image": "a.jpg"},
                                    "text|question|query", "missing field"),
    "trl prompt row lacks prompt": (read_prompts, {"prompt": "Q"}, {"text": "Q"}, "prompt", "missing field"),
    "ppo prompt without user": (read_prompts, GOOD_PPO, dict(GOOD_PPO, conversations=[{"from": "gpt",
                                "value": "A"}]), "conversations", "no human message"),
    "ppo prompt empty question": (read_prompts, GOOD_PPO, {"conversations": _turns(" ")}, "conversations",
                                  "empty user message"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_stops_or_is_counted(case, tmp_path, root):
    reader, good, bad, field, reason = BAD_ROWS[case]
    if isinstance(bad, dict) and bad.get("image") == "ABS_OUTSIDE":
        bad = dict(bad, image=str(root.parent / "outside.png"))
    path = _json(tmp_path / "data.json", [good, bad, good])
    with pytest.raises(BadRowError) as info:
        reader(path, str(root))
    err = info.value
    assert (err.where, err.field_name) == (RowRef(path, 1), field)
    assert reason in err.reason
    assert f"{path}: row 1: field '{field}'" in str(err)

    report = BadRowReport(skip=True)
    recs = reader(path, str(root), report)
    assert [r.source.row for r in recs] == [0, 2]
    assert report.skipped == [{"file": path, "row": 1, "field": field, "reason": err.reason}]
    saved = json.loads(report.write(tmp_path / "out").read_text())
    assert saved["n_skipped"] == 1 and saved["rows"][0]["row"] == 1 and saved["rows"][0]["field"] == field


def test_invalid_jsonl_line_is_a_bad_row(tmp_path, root):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(["{broken", json.dumps(GOOD_SFT), '{"image": "a.jpg",', json.dumps(GOOD_SFT)]))
    with pytest.raises(BadRowError, match=r"d\.jsonl: row 0: field '<row>': invalid JSON: .*\(line 1, column 2\)"):
        read_sft(str(path), str(root))
    report = BadRowReport(skip=True)
    assert [r.source.row for r in read_sft(str(path), str(root), report)] == [1, 3]
    assert [(s["row"], s["field"]) for s in report.skipped] == [(0, "<row>"), (2, "<row>")]
    assert report.counts() == {"<row>: invalid JSON": 2}


def test_extensionless_image_file_is_a_path(tmp_path):
    name = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d"  # looks like base64
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / name).write_bytes(RED)
    path = _json(tmp_path / "d.json", [dict(GOOD_SFT, image=f"imgs/{name}")] * 2)
    assert [r.images for r in read_sft(path, None)] == [[str(tmp_path / "imgs" / name)]] * 2


def test_captions_refused_for_formats_that_cannot_use_them(tmp_path, root):
    captions = _json(tmp_path / "image_to_caption.json", {"a.jpg": ["A bus."]})
    path = _json(tmp_path / "rlaif.json", [GOOD_RLAIF])
    with pytest.raises(DataFormatError, match=r"rlaif\.json: rlaif_v data cannot use the captions given; "
                                              "only llava_rlhf data can"):
        read_preferences(path, str(root), captions_file=captions)
    assert len(read_preferences(path, str(root))) == 1
    rlhf = _json(tmp_path / "rlhf.json", [GOOD_RLHF])
    assert read_preferences(rlhf, str(root), captions_file=captions)[0].facts == ["A bus."]


def test_opa_set_is_sft_data_and_prompts(tmp_path, root):
    """OPA-DPO's OPA set (queries, image_bytes, standard_response, AI_pseudo_response; data_formats.md) is the
    data of its OPA step, a LoRA-SFT on both answers: two conversations per row (one when they are the same),
    and prompts for rollouts with the ground truth as the reference. Without the AI_json_report it is no
    preference data (no rejected response)."""
    import datasets

    row = {"queries": "<image>\nDescribe the image.", "image_bytes": base64.b64encode(RED).decode(),
           "standard_response": "A red square.", "AI_pseudo_response": "A red square on white."}
    datasets.Dataset.from_list([row, dict(row, image_bytes=GREEN, AI_pseudo_response="A red square.")]).save_to_disk(
        str(tmp_path / "opa"))
    recs = read_sft(str(tmp_path / "opa"), str(root))
    assert [r.messages[1].content for r in recs] == ["A red square.", "A red square on white.", "A red square."]
    assert recs[0].messages[0] == Message("user", "<image>\nDescribe the image.")
    assert [r.images for r in recs] == [[RED], [RED], [GREEN]] and len({r.id for r in recs}) == 3
    assert [r.source.row for r in recs] == [0, 0, 1]
    (p, _) = read_prompts(str(tmp_path / "opa"), str(root))
    assert (p.prompt, p.reference, p.images) == (_msgs(("user", "<image>\nDescribe the image.")), "A red square.",
                                                 [RED])
    with pytest.raises(DataFormatError, match="It looks like SFT data"):
        read_preferences(str(tmp_path / "opa"), str(root))
    bad = _json(tmp_path / "bad.json", [row, dict(row, standard_response="")])
    with pytest.raises(BadRowError, match=r"row 1: field 'standard_response': empty response"):
        read_sft(bad, str(root))


def test_one_trl_row_of_lists_is_a_row_not_columns(tmp_path, root):
    """TRL's rows hold only lists (images, prompt, chosen, rejected): a .json file of one such object is one
    row, not a dict of columns; a real dict of columns is still split."""
    def msg(role, text):
        return [{"role": role, "content": [{"type": "text", "text": text}]}]

    row = {"images": [base64.b64encode(RED).decode()],
           "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}],
           "chosen": msg("assistant", "Red."), "rejected": msg("assistant", "Blue.")}
    (r,) = read_preferences(_json(tmp_path / "one.json", row), str(root))
    assert (r.prompt, r.responses, r.images) == (_msgs(("user", "<image>\nColor?")), ["Red.", "Blue."], [RED])
    columns = {k: [v, v] for k, v in row.items()}
    assert [r.responses for r in read_preferences(_json(tmp_path / "cols.json", columns), str(root))] == [
        ["Red.", "Blue."]] * 2
    sft_columns = {"image": ["a.jpg", "b.png"], "conversations": [_turns("<image>\nQ", "A"), _turns("Q2", "B")]}
    assert [r.images for r in read_sft(_json(tmp_path / "sft_cols.json", sft_columns), str(root))] == [
        [str(root / "a.jpg")], [str(root / "b.png")]]


def test_utf8_byte_order_mark_is_read(tmp_path, root):
    """Files saved by some Windows editors start with a UTF-8 byte order mark: not part of the JSON."""
    bom = "\ufeff"
    (tmp_path / "d.json").write_text(bom + json.dumps([GOOD_SFT]), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(bom + json.dumps(GOOD_SFT) + "\n" + json.dumps(GOOD_SFT) + "\n",
                                      encoding="utf-8")
    assert len(read_sft(str(tmp_path / "d.json"), str(root))) == 1
    assert [r.source.row for r in read_sft(str(tmp_path / "d.jsonl"), str(root))] == [0, 1]
    (tmp_path / "caps.json").write_text(bom + json.dumps({"a.jpg": ["A bus."]}), encoding="utf-8")
    rlhf = _json(tmp_path / "rlhf.json", [GOOD_RLHF])
    assert read_preferences(rlhf, str(root), captions_file=str(tmp_path / "caps.json"))[0].facts == ["A bus."]


def test_unusual_bad_inputs_are_bad_rows_or_errors_naming_the_file(root, tmp_path):
    """Inputs that escaped as bare Python errors (no file, row or field): a speaker that is a list, a role that is
    an object, a line that is not UTF-8, a .json file that is not UTF-8, a captions entry that is a number, a
    captions file that is not JSON."""
    good = {"id": "g", "image": "b.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                             {"from": "gpt", "value": "A green square."}]}
    bad = json.loads(json.dumps(good))
    bad["conversations"][0]["from"] = ["human"]
    trl = {"messages": [{"role": {"a": 1}, "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "images": []}
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in (good, bad)) + b'{"id": "\xe9"}\n')
    report = BadRowReport(skip=True)
    assert [r.id for r in read_sft([str(path)], str(root), report)] == ["g"]
    assert sorted((s["row"], s["field"]) for s in report.skipped) == [(1, "conversations[0].from"), (2, "<row>")]
    tpath = tmp_path / "trl.jsonl"
    tpath.write_text(json.dumps(trl) + "\n")
    with pytest.raises(BadRowError, match=r"messages\[0\]\.role"):
        read_sft([str(tpath)], str(root))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"id": "\xe9"}]')
    with pytest.raises(DataFormatError, match="latin.json: not UTF-8"):
        read_sft([str(latin)], str(root))
    row = {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": ""}],
           "output_1": {"value": "A."}, "output_2": {"value": "B."}, "preference": 1}
    pairs = tmp_path / "pairs.json"
    _json(pairs, [row])
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"b.png": 5}))
    with pytest.raises(BadRowError, match="not a caption or a list of captions"):
        read_preferences([str(pairs)], str(root), captions_file=str(caps))
    caps.write_text("{not json")
    with pytest.raises(DataFormatError, match="caps.json: not a JSON file of captions"):
        read_preferences([str(pairs)], str(root), captions_file=str(caps))

