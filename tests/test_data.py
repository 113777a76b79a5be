"""Data pipeline: tokenizer, Vicuna v1 template and label masks, synthetic set, bad records, sampler,
and the trainer's option and DeepSpeed-config checks (all in-process, no training)."""
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from m2pt_fast.data import (
    IGNORE_INDEX,
    IMAGE,
    BadRecord,
    ConversationEncoder,
    EpochShardSampler,
    ImagePreprocessor,
    LlavaJsonDataset,
    SampleBuilder,
    SyntheticInstructDataset,
    build_word_tokenizer,
    load_llava_records,
    longest_sample,
    make_collate,
    synthetic_record,
    synthetic_texts,
    words_of,
    write_llava_json,
)
from m2pt_fast.data.conversation import ASSISTANT, SYSTEM_PROMPT, USER
from m2pt_fast.training.config import TrainConfig, parse_args
from m2pt_fast.training.ds_config import DEFAULT_DS_CONFIG, resolve_ds_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGE_TOKENS = 5  # odd on purpose: nothing may assume a square number here
IMAGE_SIZE = 28


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(words_of([*synthetic_texts(), SYSTEM_PROMPT, f"{USER}: {ASSISTANT}:", "a dog b"]))


def _encoder(tokenizer, max_length=512):
    return ConversationEncoder(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE), IMAGE_TOKENS, max_length)


def _builder(tokenizer, max_length=512):
    return SampleBuilder(_encoder(tokenizer, max_length), ImagePreprocessor.clip_default(IMAGE_SIZE))


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


# ------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_layout(tokenizer):
    specials = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert specials == (0, 1, 2, 3)
    assert tokenizer.convert_tokens_to_ids(IMAGE) == len(tokenizer) - 1


def test_synthetic_vocabulary_is_closed(tokenizer):
    encoder = _encoder(tokenizer)
    for index in range(400):
        ids = encoder.encode(synthetic_record(7, index)["conversations"]).input_ids
        assert not (ids == tokenizer.unk_token_id).any(), synthetic_record(7, index)["conversations"]


# ------------------------------------------------------------------------------------- template
def test_labels_cover_exactly_the_answers(tokenizer):
    encoder = _encoder(tokenizer)
    conversation = _turns(("<image>\nWhat color is the square?", "red"), ("Is there a blue circle?", "no"))
    encoded = encoder.encode(conversation)
    ids, labels = encoded.input_ids, encoded.labels
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    assert ids[0] == tokenizer.bos_token_id
    assert (ids == image_id).sum() == IMAGE_TOKENS
    positions = (ids == image_id).nonzero().flatten()
    assert (positions.diff() == 1).all(), "the image tokens are one contiguous run"
    supervised = labels != IGNORE_INDEX
    assert (labels[supervised] == ids[supervised]).all()
    assert tokenizer.decode(ids[supervised]).split() == ["red", "</s>", "no", "</s>"]
    text = tokenizer.decode(ids[~supervised])
    assert text.count(f"{ASSISTANT} :") == 2 and text.count(f"{USER} :") == 2 and "curious user" in text


def test_image_placeholder_is_moved_to_the_start(tokenizer):
    encoder = _encoder(tokenizer)
    front = encoder.encode(_turns(("<image>\nIs there a red square?", "yes")))
    back = encoder.encode(_turns(("Is there a red square? <image>", "yes")))
    missing = encoder.encode(_turns(("Is there a red square?", "yes")))
    assert torch.equal(front.input_ids, back.input_ids) and torch.equal(front.input_ids, missing.input_ids)


@pytest.mark.parametrize("conversations, kind", [
    ([], "malformed"),
    ("hello", "malformed"),
    ([{"from": "human", "value": "<image>\nWhat?"}], "no answer"),
    (_turns(("<image>\nWhat?", "   ")), "no answer"),
    ([{"from": "gpt", "value": "yes"}], "malformed"),
    ([{"from": "robot", "value": "yes"}], "malformed"),
    ([{"from": "human"}], "malformed"),
    (_turns(("<image>\nWhat?", "yes"), ("<image> again?", "no")), "malformed"),
])
def test_bad_conversations_are_refused_with_their_kind(tokenizer, conversations, kind):
    with pytest.raises(BadRecord, match=f"^{kind}"):
        _encoder(tokenizer).encode(conversations)


def test_truncation_keeps_answers_or_refuses(tokenizer):
    conversation = _turns(("<image>\nIs there a red square?", "yes"), ("Is there a blue circle?", "no"))
    full = _encoder(tokenizer).encode(conversation).input_ids.numel()
    # cut inside the second round: truncated, the first answer stays supervised
    cut = _encoder(tokenizer, full - 3).encode(conversation)
    assert cut.input_ids.numel() == full - 3 and (cut.labels != IGNORE_INDEX).sum() >= 2
    # cut before the first answer: nothing left to learn from
    with pytest.raises(BadRecord, match="^over-long"):
        _encoder(tokenizer, IMAGE_TOKENS + 30).encode(conversation)
    # cut inside the image tokens
    with pytest.raises(BadRecord, match="image tokens"):
        _encoder(tokenizer, 10).encode(conversation)


# ------------------------------------------------------------------------ datasets and collate
def test_synthetic_samples_are_deterministic_and_collate_right_padded(tokenizer):
    dataset = SyntheticInstructDataset(64, seed=3, build=_builder(tokenizer))
    a, b = dataset[11], dataset[11]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and a["pixel_values"].dtype == torch.float32
    samples = [dataset[i] for i in range(5)]
    batch = make_collate(tokenizer.pad_token_id)(samples)
    lengths = [s["input_ids"].numel() for s in samples]
    assert batch["input_ids"].shape == (5, max(lengths))
    assert batch["pixel_values"].shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    assert batch["skipped"] == []


def test_synthetic_task_families_all_appear():
    questions = " ".join(c["value"] for i in range(300) for c in synthetic_record(0, i)["conversations"])
    for phrase in ("Is there", "color", "How many", "left of", "digit", "shape"):
        assert phrase in questions or phrase.lower() in questions.lower(), phrase


@pytest.fixture
def bad_data_set(tmp_path):
    """12 good synthetic records plus one of each bad kind."""
    data_path, images = write_llava_json(tmp_path, 12, seed=1)
    records = json.loads(open(data_path).read())
    (tmp_path / "images" / "corrupt.png").write_bytes(b"this is not a png")
    truncated = (tmp_path / "images" / "000000.png").read_bytes()
    (tmp_path / "images" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    good = records[0]["conversations"]
    records += [
        {"id": "missing", "image": "nowhere.png", "conversations": good},
        {"id": "corrupt", "image": "corrupt.png", "conversations": good},
        {"id": "no-answer", "image": "000001.png", "conversations": good[:1]},
        {"id": "malformed", "image": "000001.png", "conversations": [{"from": "human"}]},
        "not even an object",
        {"id": "no-image", "conversations": good},
        {"id": "over-long", "image": "000001.png",
         "conversations": _turns(("<image>\n" + "Is there a red square?" * 100, "yes"))},
        {"id": "truncated", "image": "truncated.png", "conversations": good},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return str(tmp_path / "data.json"), images


def test_bad_records_are_skipped_and_counted(tokenizer, bad_data_set, caplog):
    data_path, images = bad_data_set
    with caplog.at_level(logging.WARNING):
        records, report = load_llava_records(data_path, images, _encoder(tokenizer, max_length=400))
    assert [r["id"] for r in records][-1] == "truncated" and len(records) == 13  # its header reads fine
    assert report.total == 7
    assert report.counts == {"missing image": 1, "corrupt image": 1, "no answer": 1, "malformed": 3, "over-long": 1}
    assert "skipped 7 of 20 records" in caplog.text

    # the truncated image fails to decode only when read: its slot is filled by the next record
    dataset = LlavaJsonDataset(records, _builder(tokenizer, max_length=400))
    sample = dataset[12]
    assert len(sample["skipped"]) == 1 and "truncated" in sample["skipped"][0]
    assert torch.equal(sample["input_ids"], dataset[0]["input_ids"])
    batch = make_collate(tokenizer.pad_token_id)([dataset[11], sample])
    assert batch["input_ids"].shape[0] == 2 and len(batch["skipped"]) == 1


def test_the_longest_sample_is_what_the_data_set_builds(tokenizer, tmp_path):
    data_path, images = write_llava_json(tmp_path, 12, seed=6)
    records = json.loads(open(data_path).read())
    question = "<image>\nWhat is here?"
    records += [{"id": "long", "image": "000002.png",
                 "conversations": _turns((question, " ".join(["red square"] * 30)))},
                {"id": "cut", "image": "000003.png",  # over max_length: truncated, its labels with it
                 "conversations": _turns((question, " ".join(["red square"] * 60)))}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    loaded, _ = load_llava_records(tmp_path / "data.json", images, _encoder(tokenizer, max_length=120))
    dataset = LlavaJsonDataset(loaded, _builder(tokenizer, max_length=120))
    samples = [dataset[i] for i in range(len(dataset))]
    lengths = [s["input_ids"].numel() for s in samples]
    labelled = [int((s["labels"] != IGNORE_INDEX).sum()) for s in samples]
    assert longest_sample(loaded) == (max(lengths), max(labelled))
    assert lengths[-1] == 120 and max(lengths[:-1]) < 120  # the cut one, at its truncated length
    assert labelled[-1] == max(labelled) and 61 < labelled[-1] < 121  # more than "long"'s 60 words + </s>, cut


def test_a_data_set_with_nothing_usable_is_an_error(tokenizer, tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([{"id": 1, "image": "gone.png", "conversations": []}]))
    with pytest.raises(ValueError, match="no usable record"):
        load_llava_records(tmp_path / "data.json", tmp_path, _encoder(tokenizer))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_llava_records(tmp_path / "broken.json", tmp_path, _encoder(tokenizer))
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a list"):
        load_llava_records(tmp_path / "dict.json", tmp_path, _encoder(tokenizer))


def test_image_preprocessor_from_model_dir(tmp_path):
    from transformers import CLIPImageProcessor

    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImagePreprocessor.from_model_dir(tmp_path, 28)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    pixels = ImagePreprocessor.from_model_dir(tmp_path, 28)(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert pixels.shape == (3, 28, 28)
    with pytest.raises(ValueError, match="crop_size"):
        ImagePreprocessor.from_model_dir(tmp_path, 32)(Image.new("RGB", (50, 40)))


# -------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("size, world, batch, accumulation", [(103, 2, 4, 3), (64, 1, 8, 1), (17, 2, 1, 2)])
def test_sampler_shards_disjointly_and_resumes_mid_epoch(size, world, batch, accumulation):
    samplers = [EpochShardSampler(size, world, r, seed=5, batch_size=batch, accumulation=accumulation)
                for r in range(world)]
    per_rank = samplers[0].batches_per_epoch
    assert per_rank % accumulation == 0 and per_rank * batch * world <= size
    for epoch in (0, 1):
        shards = []
        for s in samplers:
            s.set_position(epoch)
            shards.append(list(s))
            assert len(shards[-1]) == len(s) == per_rank * batch
        flat = [i for shard in shards for i in shard]
        assert len(set(flat)) == len(flat)
        s = samplers[-1]
        s.set_position(epoch, start_batch=accumulation)
        assert list(s) == shards[-1][accumulation * batch:]
    samplers[0].set_position(0)
    first = list(samplers[0])
    samplers[0].set_position(1)
    assert first != list(samplers[0]), "each epoch has its own order"


def test_sampler_refuses_a_data_set_smaller_than_one_step():
    with pytest.raises(ValueError, match="one optimizer step needs 16"):
        EpochShardSampler(10, 2, 0, seed=0, batch_size=4, accumulation=2)


# ----------------------------------------------------------------------------- options, configs
def test_options_come_from_defaults_then_yaml_then_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 0.001\nmax_steps: 7\ntune_projector: false\n")
    config = parse_args(["--config", str(recipe), "--max_steps", "9", "--gradient_checkpointing", "--local_rank=1"])
    got = (config.learning_rate, config.max_steps, config.tune_projector, config.gradient_checkpointing)
    assert got == (1e-3, 9, False, True)
    assert parse_args([]).learning_rate == 5e-3, "the embedded tiny model's own default"
    for name in ("config.json", "preprocessor_config.json"):  # what a model directory must hold
        (tmp_path / name).write_text("{}")
    assert parse_args(["--model_name_or_path", str(tmp_path)]).learning_rate == 7e-4, "the paper's"
    recipe.write_text("learning_rat: 0.001\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rat"):
        parse_args(["--config", str(recipe)])


@pytest.mark.parametrize("options, message", [
    (dict(max_steps=0), "--max_steps"),
    (dict(per_device_train_batch_size=0), "--per_device_train_batch_size"),
    (dict(warmup_ratio=1.5), "--warmup_ratio"),
    (dict(lr_scheduler_type="cosine_with_restarts"), "--lr_scheduler_type"),
    (dict(quant="int8"), "--quant"),
    (dict(image_folder="."), "without --data_path"),
    (dict(model_name_or_path="lmsys/vicuna-7b"), "nothing is downloaded"),
    (dict(num_vision_prompts=0, num_text_prompts=0, tune_projector=False), "nothing to train"),
    (dict(quant="nf4", tune_lm_head=True), "--tune_lm_head"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_ds_config_autos_are_filled_from_the_options():
    config = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=0.5)
    ds = resolve_ds_config(json.loads((CONFIGS / "zero3.json").read_text()), config, world_size=2, bf16=False)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    assert resolve_ds_config(DEFAULT_DS_CONFIG, config, 1, True)["bf16"]["enabled"] is True


@pytest.mark.parametrize("change, message", [
    (lambda ds: ds.update(scheduler={"type": "WarmupLR"}), "scheduler.*cosine"),
    (lambda ds: ds.update(optimizer={"type": "AdamW"}), "optimizer"),
    (lambda ds: ds.update(train_micro_batch_size_per_gpu=16), "per_device_train_batch_size"),
    (lambda ds: ds.update(fp16={"enabled": True}), "fp16"),
])
def test_ds_config_conflicts_are_refused(change, message):
    ds = json.loads((CONFIGS / "zero2.json").read_text())
    change(ds)
    with pytest.raises(ValueError, match=message):
        resolve_ds_config(ds, TrainConfig(), 1, False)


def test_zero3_with_nf4_is_refused():
    with pytest.raises(ValueError, match="ZeRO-3 with --quant nf4"):
        resolve_ds_config(json.loads((CONFIGS / "zero3.json").read_text()), TrainConfig(quant="nf4"), 1, True)


def test_shipped_ds_configs_resolve():
    names = sorted(p.name for p in CONFIGS.glob("*.json"))
    for stage in ("zero0", "zero1", "zero2", "zero3", "offload"):
        assert any(stage in n for n in names), stage
    for path in [*CONFIGS.glob("*.json"), CONFIGS.parent / "ds.json"]:
        resolve_ds_config(json.loads(path.read_text()), TrainConfig(), 2, False, where=str(path))


def test_shipped_recipes_use_known_options():
    import yaml

    from m2pt_fast.training.config import _check_yaml_values

    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert "m2pt_fast/train.py" in path.read_text().split("\n\n")[0], f"{path}: the header shows the launch command"
        _check_yaml_values(str(path), yaml.safe_load(path.read_text()))
    assert parse_args(["--config", str(CONFIGS / "tiny.yaml")]).num_synthetic_samples == 1024


def test_answers_are_tokenized_as_in_running_text():
    # Like the legacy LLaMA tokenizer: "▁" prepended to the text and spaces made "▁", so " yes" on its
    # own gives a stray "▁" before "▁yes".
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words_of([SYSTEM_PROMPT, f"{USER}: {ASSISTANT}:", "Is it red? yes"])
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "▁", IMAGE, *(f"▁{w}" for w in words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert sp(" yes", add_special_tokens=False).input_ids == [vocab["▁"], vocab["▁yes"]]

    encoder = ConversationEncoder(sp, vocab[IMAGE], IMAGE_TOKENS, 512)
    encoded = encoder.encode(_turns(("<image>\nIs it red?", "yes")))
    answer = encoded.input_ids[encoded.labels != IGNORE_INDEX].tolist()
    assert answer == [vocab["▁yes"], sp.eos_token_id]


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white(tmp_path):
    import numpy as np
    from PIL import Image

    from m2pt_fast.data.image import as_rgb

    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)  # black, dark, mid grey, white
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")  # what PNG decoders give for 16-bit grey
        rgb = np.asarray(as_rgb(image))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    import numpy as np
    from PIL import Image

    from m2pt_fast.data.image import as_rgb

    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[:, :2] = (255, 0, 0)  # left half red, right half blue, as stored
    pixels[:, 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.png"
    Image.fromarray(pixels).save(path, exif=exif)
    with Image.open(path) as image:
        shown = np.asarray(as_rgb(image))
    assert shown.shape == (4, 2, 3)  # upright: taller than wide
    assert (shown[:2, :, 0] == 255).all() and (shown[2:, :, 2] == 255).all()  # the stored left is now on top


def test_a_data_file_that_is_not_utf8_is_named(tokenizer, tmp_path):
    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8 text"):
        load_llava_records(tmp_path / "latin1.json", tmp_path, _encoder(tokenizer))


def test_a_decompression_bomb_is_called_too_large_not_corrupt(tokenizer, tmp_path, monkeypatch):
    from PIL import Image

    data_path, images = write_llava_json(tmp_path, 2, seed=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the synthetic images are larger than 2 x 100 pixels
    with pytest.raises(ValueError, match=r"\{'image too large': 2\}"):
        load_llava_records(data_path, images, _encoder(tokenizer, max_length=400))


def _truncate_images(records, positions):
    for i in positions:
        path = Path(records[i]["image"])
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header still reads


def test_a_long_block_of_undecodable_images_costs_only_its_records(tokenizer, tmp_path):
    from m2pt_fast.data import LlavaJsonDataset, check_images_decode

    data_path, images = write_llava_json(tmp_path, 120, seed=4)
    records, _ = load_llava_records(data_path, images, _encoder(tokenizer, max_length=400))
    assert len(records) == 120
    _truncate_images(records, range(40, 80))  # 40 bad in a row
    builder = _builder(tokenizer, 400)
    assert 0 < check_images_decode(records, builder) < 16  # some sampled images fail, not all
    dataset = LlavaJsonDataset(records, builder)
    for index in (39, 40, 60, 79, 80):
        sample = dataset[index]
        expected_skips = 0 if index in (39, 80) else 80 - index
        assert len(sample["skipped"]) <= expected_skips  # records found bad before are not retried
        assert torch.equal(sample["input_ids"], dataset[80 if 40 <= index < 80 else index]["input_ids"])


def test_a_data_set_whose_images_never_decode_stops_before_training(tokenizer, tmp_path):
    from m2pt_fast.data import check_images_decode

    data_path, images = write_llava_json(tmp_path, 20, seed=5)
    records, _ = load_llava_records(data_path, images, _encoder(tokenizer, max_length=400))
    _truncate_images(records, range(20))
    with pytest.raises(ValueError, match="none of the 16 images checked before training decodes"):
        check_images_decode(records, _builder(tokenizer, 400))
