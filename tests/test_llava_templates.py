"""Our input is LLaVA's, token for token: its templates (v1, llava_v1, plain) built as its
Conversation.get_prompt does, tokenized as its tokenizer_image_token does (each side of <image>
apart, every chunk's BOS but the first dropped), with a tokenizer that behaves like LLaMA's legacy
SentencePiece (a "▁" before every text segment, spaces as "▁", a lone trailing space its own token),
against ConversationEncoder; and LLaVA-1.5's "pad" preprocessing against its expand2square rule."""
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from m2pt_fast.data.conversation import (
    IGNORE_INDEX,
    LLAVA_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    BadRecord,
    ConversationEncoder,
)

IMAGE_TOKEN_INDEX = -200  # LLaVA's
IMAGE_TOKENS = 4
CONVERSATIONS = [
    [("<image>\nWhat colour is the square?", "Red."), ("And the circle?", "It is blue, like the sky.")],
    [("How many shapes are there?\n<image>", "Three")],  # the image moved to the front, as LLaVA does
    [("<image>\nDescribe it.", "A small grey square in the top left corner.")],
]


@pytest.fixture(scope="module")
def llama_like():
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    corpus = [SYSTEM_PROMPT, LLAVA_SYSTEM_PROMPT, "USER: ASSISTANT:"] + [t for c in CONVERSATIONS for q, a in c
                                                                           for t in (q, a)]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tokenizer("USER: ", add_special_tokens=False).input_ids[-1] == tokenizer.convert_tokens_to_ids("▁")
    return tokenizer


def llava_prompt(version, turns):
    """LLaVA's get_prompt (SeparatorStyle.TWO, or PLAIN), with preprocess_multimodal's image move."""
    if version == "plain":
        return "<image>" + turns[0][1] + "\n"
    system = {"v1": SYSTEM_PROMPT, "llava_v1": LLAVA_SYSTEM_PROMPT}[version]
    text, seps = system + " ", (" ", "</s>")
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = "<image>\n" + question.replace("<image>", "").strip()
        text += "USER: " + question + seps[0] + "ASSISTANT: " + answer + seps[1]
    return text


def tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]  # the BOS, once
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:])
    return ids


# the plain template is one caption per image: its multi-round case is refused (the next test)
@pytest.mark.parametrize("version, index", [(v, i) for v in ("v1", "llava_v1", "plain") for i in range(3)
                                            if v != "plain" or len(CONVERSATIONS[i]) == 1])
def test_input_ids_are_llava_s_token_for_token(llama_like, version, index):
    turns = CONVERSATIONS[index]
    image_id = len(llama_like)
    encoder = ConversationEncoder(llama_like, image_id, IMAGE_TOKENS, 512, version=version)
    records = [{"from": "human", "value": q} for q, _ in turns]
    conversation = [turn for pair in zip(records, [{"from": "gpt", "value": a} for _, a in turns]) for turn in pair]
    encoded = encoder.encode(conversation)
    ours = encoded.input_ids.tolist()
    first = ours.index(image_id)
    assert ours[first:first + IMAGE_TOKENS] == [image_id] * IMAGE_TOKENS
    collapsed = ours[:first] + [IMAGE_TOKEN_INDEX] + ours[first + IMAGE_TOKENS:]
    assert collapsed == tokenizer_image_token(llava_prompt(version, turns), llama_like)
    supervised = encoded.input_ids[encoded.labels != IGNORE_INDEX].tolist()
    if version == "plain":  # the caption and its "\n": LLaVA masks the BOS and the image only
        assert supervised == collapsed[2:]
    else:  # every answer and its </s>
        prefix = len(llama_like("ASSISTANT:", add_special_tokens=False).input_ids)
        answers = [llama_like(f"ASSISTANT: {a}", add_special_tokens=False).input_ids[prefix:] for _, a in turns]
        assert supervised == [t for ids in answers for t in ids + [llama_like.eos_token_id]]


def test_the_plain_template_takes_one_caption(llama_like):
    encoder = ConversationEncoder(llama_like, len(llama_like), IMAGE_TOKENS, 512, version="plain")
    with pytest.raises(BadRecord, match="one caption per image"):
        encoder.encode([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"},
                        {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}])
    with pytest.raises(ValueError, match="--version must be one of"):
        ConversationEncoder(llama_like, 0, IMAGE_TOKENS, 512, version="v2")


def test_pad_centres_the_image_on_the_mean_colour_as_expand2square_does():
    from PIL import Image

    from m2pt_fast.data.image import pad_to_square

    mean = (0.5, 0.25, 0.75)
    wide = Image.new("RGB", (3, 2), (255, 0, 0))  # odd difference: the extra row goes below
    square = pad_to_square(wide, mean)
    assert square.size == (3, 3)
    assert [square.getpixel((x, y)) for y in range(3) for x in (0, 2)] == [(255, 0, 0)] * 4 + [(127, 63, 191)] * 2
    tall = Image.new("RGB", (1, 4), (0, 255, 0))  # two columns on each side? (4-1)//2 = 1 left, 2 right
    square = pad_to_square(tall, mean)
    assert [square.getpixel((x, 0)) for x in range(4)] == [(127, 63, 191), (0, 255, 0), (127, 63, 191), (127, 63, 191)]
    assert pad_to_square(Image.new("RGB", (2, 2)), mean).size == (2, 2)


def test_pad_keeps_what_crop_cuts_away():
    from PIL import Image

    from m2pt_fast.data.image import ImagePreprocessor

    image = Image.new("RGB", (56, 28), (0, 0, 255))
    for x in range(4):  # a red stripe at the left edge: the centre crop removes it, pad keeps it
        for y in range(28):
            image.putpixel((x, y), (255, 0, 0))
    crop, pad = (ImagePreprocessor.clip_default(28, aspect)(image) for aspect in ("crop", "pad"))
    assert crop.shape == pad.shape == (3, 28, 28)
    assert crop[0, 14, 0] < 0 < pad[0, 8, 1]  # red channel: blue in the crop's first column, red in pad's
    assert abs(pad[0, 0, 14]) < 0.02  # the padding is the mean colour: about 0 once normalized
    with pytest.raises(ValueError, match="--image_aspect_ratio must be one of"):
        ImagePreprocessor.clip_default(28, "stretch")


@pytest.mark.slow
def test_the_trainer_takes_the_template_and_the_aspect_ratio(tmp_path):
    import json

    from launch import python_run

    from m2pt_fast.data import write_llava_json

    data_path, images = write_llava_json(tmp_path / "data", 8, seed=3)
    python_run(tmp_path / "out", "--version", "llava_v1", "--image_aspect_ratio", "pad", "--data_path", data_path,
               "--image_folder", images, "--max_steps", "2", "--per_device_train_batch_size", "4",
               "--dataloader_num_workers", "0")
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())["config"]
    assert (config["version"], config["image_aspect_ratio"]) == ("llava_v1", "pad")
    result = python_run(tmp_path / "bad", "--version", "v2", expect=2)
    assert "--version" in result.stderr
