"""python -m m2pt_fast.evaluate end to end on the embedded model, with benchmark files the tests
write in their official layouts (MME's two folder layouts, POPE's JSON lines, an M²PT task file):
batched answers equal unbatched ones, the files people read are written, a trained run's prompts
are what gets evaluated, and bad inputs are named."""
import json
from pathlib import Path

import pytest
from PIL import Image

from m2pt_fast.evaluation.benchmark_files import LoadReport, load_benchmark
from m2pt_fast.evaluation.evaluate import main


def _image(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    # MME: "existence" with images/ beside questions_answers_YN/, "count" side by side
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        _image(root / "mme" / "existence" / "images" / f"{name}.jpg", colour)
        (root / "mme" / "existence" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (root / "mme" / "existence" / "questions_answers_YN" / f"{name}.txt").write_text(
            "Is there a red square in the image? Please answer yes or no.\tYes\n"
            "Is there a circle in the image? Please answer yes or no.\tNo\n")
        _image(root / "mme" / "count" / f"{name}.png", colour)
        (root / "mme" / "count" / f"{name}.txt").write_text("Are there two shapes? Please answer yes or no.\tNo\n"
                                                             "Is there one shape? Please answer yes or no.\tYes\n")
    (root / "mme" / "count" / "orphan.txt").write_text("Is it? Please answer yes or no.\tYes\n")  # no image
    # POPE
    for split in ("adversarial", "popular", "random"):
        lines = [{"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg", "text": "Is there a square in the image?",
                  "label": "yes" if i % 2 else "no"} for i in range(3)]
        (root / "pope").mkdir(exist_ok=True)
        (root / "pope" / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines) + "{bad\n")
    for i in range(3):
        _image(root / "pope" / "val2014" / f"COCO_val2014_{i:012d}.jpg", (0, 255 * (i % 2), 0))
    # an M²PT held-out task file
    (root / "tasks").mkdir()
    rows = [{"unique_id": f"m{i}", "image_path": f"img/{i}.png", "prompt": "What digit is shown?", "target": str(i)}
            for i in range(4)]
    rows.append({"unique_id": "gone", "image_path": "img/missing.png", "prompt": "?", "target": "0"})
    (root / "tasks" / "mnist.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i in range(4):
        _image(root / "tasks" / "img" / f"{i}.png", (20 * i, 20 * i, 20 * i))
    # TextVQA (val images live in train_images/), its OCR file; VSR; SNLI-VE with both id spellings
    (root / "textvqa").mkdir()
    (root / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 7, "question": "what brand is it?", "image_id": "abc", "answers": ["nike"] * 9 + ["adidas"]},
        {"question_id": 8, "question": "what number?", "image_id": "gone", "answers": ["2"] * 10}]}))
    (root / "textvqa" / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(json.dumps({"data": [
        {"image_id": "abc", "ocr_tokens": ["NIKE", "run"]}]}))
    _image(root / "textvqa" / "train_images" / "abc.jpg", (9, 9, 9))
    (root / "vsr").mkdir()
    (root / "vsr" / "zeroshot_test.jsonl").write_text(
        json.dumps({"image": "1.jpg", "caption": "The cat is left of the dog.", "label": 1}) + "\n"
        + json.dumps({"image": "1.jpg", "caption": "The dog is on the cat.", "label": 0}) + "\n")
    _image(root / "vsr" / "images" / "1.jpg", (1, 2, 3))
    (root / "snli").mkdir()
    (root / "snli" / "snli_ve_test.jsonl").write_text(
        json.dumps({"Flickr30K_ID": "55", "sentence2": "A dog runs.", "gold_label": "entailment"}) + "\n"
        + json.dumps({"Flikr30kID": "55", "sentence2": "A cat sleeps.", "gold_label": "contradiction"}) + "\n"
        + json.dumps({"Flickr30K_ID": "55", "sentence2": "?", "gold_label": "-"}) + "\n")
    _image(root / "snli" / "flickr30k_images" / "55.jpg", (4, 5, 6))
    return root


def test_loaders_read_the_official_layouts_and_count_what_they_skip(data):
    report = LoadReport()
    mme = load_benchmark("mme", data / "mme", report=report)
    assert len(mme) == 8 and {q.extra["category"] for q in mme} == {"existence", "count"}
    assert {q.target for q in mme} == {"Yes", "No"} and report.skipped["MME: no image for its questions"] == 1
    pope = load_benchmark("pope", data / "pope", report=report)
    assert len(pope) == 9 and report.skipped["POPE: a line that is not JSON"] == 3
    assert pope[0].text.endswith("\nAnswer the question using a single word or phrase.")
    mnist = load_benchmark("mnist", data / "tasks", report=report)
    assert [q.question_id for q in mnist] == ["m0", "m1", "m2", "m3"] and report.skipped["mnist: a missing image"] == 1
    with pytest.raises(FileNotFoundError, match="coco_pope_adversarial.json does not exist"):
        load_benchmark("pope", data / "tasks")
    (textvqa,) = load_benchmark("textvqa", data / "textvqa", report=report)
    assert textvqa.text == ("what brand is it?\nReference OCR token: NIKE, run\n"
                            "Answer the question using a single word or phrase.")
    assert textvqa.target == ["nike"] * 9 + ["adidas"] and report.skipped["TextVQA: a missing image"] == 1
    vsr = load_benchmark("vsr", data / "vsr", report=report)
    assert [q.target for q in vsr] == ["yes", "no"] and '"The cat is left of the dog."' in vsr[0].text
    snli = load_benchmark("snli_ve", data / "snli", report=report)
    assert [q.target for q in snli] == ["entailment", "contradiction"]
    assert report.skipped["SNLI-VE: a record without an image id, sentence2 and a gold_label"] == 1


def _evaluate(out, *args):
    assert main([*args, "--output_dir", str(out), "--max_new_tokens", "4"]) == 0
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()], \
        json.loads((out / "scores.json").read_text())


@pytest.mark.slow
def test_batched_answers_equal_unbatched_and_the_results_are_written(data, tmp_path):
    one, scores = _evaluate(tmp_path / "b1", "--benchmark", "mme", "--data_dir", str(data / "mme"), "--batch_size", "1")
    many, _ = _evaluate(tmp_path / "b3", "--benchmark", "mme", "--data_dir", str(data / "mme"), "--batch_size", "3")
    assert [r["text"] for r in one] == [r["text"] for r in many] and len(one) == 8
    assert set(scores["benchmarks"]["mme"]) == {"perception", "cognition", "total", "subtasks"}
    assert scores["model"] == "embedded" and scores["output"] is None
    assert "MME perception" in (tmp_path / "b1" / "scores.md").read_text()
    rows, scores = _evaluate(tmp_path / "pope", "--benchmark", "pope", "--data_dir", str(data / "pope"))
    assert {r["benchmark"] for r in rows} == {"pope_adversarial", "pope_popular", "pope_random"}
    assert set(scores["benchmarks"]["pope_random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert scores["mm_avg"] is not None


@pytest.mark.slow
def test_a_trained_run_is_evaluated_with_its_prompts(data, tmp_path):
    from launch import python_run

    run = tmp_path / "run"
    python_run(run, "--max_steps", "2", "--dataloader_num_workers", "0", "--num_synthetic_samples", "32")
    rows, scores = _evaluate(tmp_path / "eval", "--run_dir", str(run), "--benchmark", "mnist", "--data_dir",
                             str(data / "tasks"))
    assert scores["output"] == str(run / "prompts.safetensors") and scores["method"] == "m2pt"
    assert len(rows) == 4 and 0.0 <= scores["benchmarks"]["mnist"]["accuracy"] <= 1.0
    base, _ = _evaluate(tmp_path / "base", "--benchmark", "mnist", "--data_dir", str(data / "tasks"))
    assert len(base) == 4


def test_bad_inputs_are_named(data, tmp_path, capsys):
    assert main(["--run_dir", str(tmp_path), "--benchmark", "mnist", "--data_dir", str(data / "tasks")]) == 2
    assert "has no run_config.json" in capsys.readouterr().err
    assert main(["--benchmark", "mnist", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    assert "mnist.jsonl does not exist" in capsys.readouterr().err


def test_own_files_count_in_mm_avg_as_the_paper_s_tasks(data, tmp_path):
    assert main(["--benchmark", "textvqa", "--data_dir", str(data / "textvqa"), "--output_dir", str(tmp_path),
                 "--max_new_tokens", "3"]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["mm_avg"] == scores["benchmarks"]["textvqa"]["accuracy"]
    (row,) = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    from m2pt_fast.evaluation.scorers import vqa_accuracy

    assert scores["benchmarks"]["textvqa"]["accuracy"] == vqa_accuracy(row["text"], row["target"])


@pytest.mark.slow
def test_two_processes_answer_and_score_as_one(data, tmp_path):
    from launch import deepspeed_launcher, free_port, run

    one, scores_one = _evaluate(tmp_path / "one", "--benchmark", "mme", "--data_dir", str(data / "mme"),
                                "--batch_size", "2")
    run([*deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "m2pt_fast.evaluate",
         "--benchmark", "mme", "--data_dir", str(data / "mme"), "--batch_size", "2",
         "--output_dir", str(tmp_path / "two"), "--max_new_tokens", "4"])
    two = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    scores_two = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert two == one  # every question, in order, answered alike
    assert scores_two["benchmarks"] == scores_one["benchmarks"] and scores_two["settings"]["processes"] == 2


def test_chat_answers_as_evaluate_does(data, tmp_path, capsys, monkeypatch):
    import io

    from m2pt_fast.evaluation.chat import main as chat

    image = data / "tasks" / "img" / "1.png"
    evaluated, _ = _evaluate(tmp_path / "e", "--benchmark", "mnist", "--data_dir", str(data / "tasks"))
    capsys.readouterr()
    assert chat(["--image", str(image), "--question", "What digit is shown?", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == evaluated[1]["text"]  # the same image and question
    monkeypatch.setattr("sys.stdin", io.StringIO("What digit is shown?\n\nWhat digit is shown?\n"))
    assert chat(["--image", str(image), "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == [evaluated[1]["text"]] * 2
    assert chat(["--image", str(tmp_path / "none.png"), "--question", "?"]) == 2


def test_compare_puts_evaluations_in_one_table_and_a_radar_plot(tmp_path):
    def fake(name, mnist, cifar, mme):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scores.json").write_text(json.dumps({"benchmarks": {
            "mnist": {"accuracy": mnist}, "cifar_10": {"accuracy": cifar},
            "mme": {"perception": mme, "cognition": 0.0, "total": mme, "subtasks": {}}},
            "mm_avg": (mnist + cifar) / 2}))
        return str(tmp_path / name)

    runs = [fake("base", 0.5, 0.25, 1000.0), fake("m2pt", 0.75, 0.5, 1200.0)]
    assert main(["--compare", *runs, "--output_dir", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[0] == "| benchmark | base | m2pt |"
    assert "| mnist | 50.00 | 75.00 |" in table and "| mme (perception) | 1000.00 | 1200.00 |" in table
    assert table[-1] == "| MMAvg | 37.50 | 62.50 |"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert main(["--compare", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "x")]) == 2


def test_the_synthetic_held_out_families_are_never_trained_on():
    from m2pt_fast.data import held_out_record, synthetic_record
    from m2pt_fast.data.synthetic import ANY_SHAPE, COLORS, DIGIT_COLOR, NUMBER_WORDS, TOTAL

    asked = {turn["value"].replace("<image>", "").strip() for i in range(2000)
             for turn in synthetic_record(42, i)["conversations"] if turn["from"] == "human"}
    held_out = {t.format(shape=s) for t in DIGIT_COLOR + TOTAL + ANY_SHAPE for s in ("circle", "square", "triangle",
                                                                                   "diamond")}
    assert not asked & held_out and len(asked) > 50
    records = [held_out_record(42, k) for k in range(30)]
    assert [r["family"] for r in records[:3]] == ["digit_color", "total", "any_shape"]
    assert all(r["answer"] in COLORS for r in records if r["family"] == "digit_color")
    assert all(r["answer"] in NUMBER_WORDS[1:6] for r in records if r["family"] == "total")  # scenes hold 1-5
    assert held_out_record(42, 5)["answer"] == held_out_record(42, 5)["answer"]  # a pure function
    assert held_out_record(42, 5)["image"].tobytes() == held_out_record(42, 5)["image"].tobytes()


def test_evaluate_synthetic_reports_seen_and_held_out(tmp_path):
    assert main(["--benchmark", "synthetic", "--limit", "6", "--max_new_tokens", "3",
                 "--output_dir", str(tmp_path)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["synthetic"]) == {"seen", "held_out"} and "synthetic_seen" not in scores["benchmarks"]
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["benchmark"] for r in rows] == ["synthetic_seen"] * 6 + ["synthetic_held_out"] * 6
    assert "synthetic, held out" in (tmp_path / "scores.md").read_text()


def test_llava_question_files_are_asked_as_written_and_answered_in_llava_s_format(data, tmp_path):
    # LLaVA's question files: question_id (often an int), image, text (instructions included), category
    root = tmp_path / "llava"
    _image(root / "images" / "x.jpg", (200, 10, 10))
    rows = [{"question_id": 101, "image": "x.jpg", "text": "Is it red?\nAnswer the question using a single word or "
             "phrase.", "category": "color"},
            {"question_id": 102, "image": "x.jpg", "text": "Is it blue?"},
            {"question_id": 103, "image": "missing.jpg", "text": "?"},
            {"image": "x.jpg", "text": "no id"}]
    (root / "llava_mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    report = LoadReport()
    from m2pt_fast.evaluation.benchmark_files import load_llava_questions

    questions = load_llava_questions(root / "llava_mini.jsonl", root / "images", report)
    assert [q.question_id for q in questions] == ["101", "102"] and questions[0].text == rows[0]["text"]
    assert sum(report.skipped.values()) == 3
    predictions, scores = _evaluate(tmp_path / "out", "--question_file", str(root / "llava_mini.jsonl"),
                                    "--image_folder", str(root / "images"))
    answer_file = tmp_path / "out" / "answers" / "llava_mini.jsonl"
    answers = [json.loads(line) for line in answer_file.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [101, 102]  # the file's own ids, their type kept
    assert set(answers[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert [a["text"] for a in answers] == [p["text"] for p in predictions]
    assert answers[0]["prompt"] == rows[0]["text"]
    assert scores["benchmarks"]["llava_mini"] == {"accuracy": None, "questions": 2}  # no answers: not scored
    assert scores["mm_avg"] is None and "unscored" in (tmp_path / "out" / "scores.md").read_text()
    # with answers in the records, the same file is scored
    for r in rows[:2]:
        r["answer"] = "yes"
    (root / "llava_scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    _, scores = _evaluate(tmp_path / "scored", "--question_file", str(root / "llava_scored.jsonl"),
                          "--image_folder", str(root / "images"))
    assert 0.0 <= scores["benchmarks"]["llava_scored"]["accuracy"] <= 1.0


def _judge_dir(path: Path, first_word: str) -> Path:
    """A tiny causal LM whose lm_head is zero, so greedy decoding emits token id 0: `first_word`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [first_word, "yes" if first_word == "no" else "no", "<unk>", "<s>", "</s>", "<pad>"]
    words += sorted(set(w.lower() for w in "Decide whether a model answer to question about an image is correct "
                        "Question Reference Model s Is the Answer or What digit shown".split()))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(vocab),
                                         pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                                         eos_token_id=vocab["</s>"]))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("first_word, expected", [("yes", 1.0), ("no", 0.0)])
def test_a_local_judge_rules_on_every_answer(data, tmp_path, first_word, expected):
    from m2pt_fast.evaluation.judge import judge_prompt, verdict

    judge = _judge_dir(tmp_path / "judge", first_word)
    _, scores = _evaluate(tmp_path / "out", "--benchmark", "mnist", "--data_dir", str(data / "tasks"),
                          "--judge_model_name_or_path", str(judge))
    mnist = scores["benchmarks"]["mnist"]
    assert mnist["judge_accuracy"] == expected and scores["mm_avg_judge"] == expected
    assert 0.0 <= mnist["accuracy"] <= 1.0 and scores["judge"] == str(judge)
    assert "judge" in (tmp_path / "out" / "scores.md").read_text()
    # what the judge is asked, and how its reply is read
    text = judge_prompt("What digit is shown?", ["7", "7", "1"], "seven")
    assert "Question: What digit is shown?" in text and "Reference answer: 7" in text and "answer: seven" in text
    assert verdict("Yes.") and verdict(" yes, it is") and not verdict("No") and not verdict("") \
        and not verdict("The answer is yes")


def test_a_judge_directory_that_is_not_a_model_is_named(data, tmp_path, capsys):
    assert main(["--benchmark", "mnist", "--data_dir", str(data / "tasks"), "--output_dir", str(tmp_path / "o"),
                 "--max_new_tokens", "2", "--judge_model_name_or_path", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
