"""m2pt_fast.evaluation.scorers on cases worked by hand from the official scripts' rules, the
answers that trip parsers included."""
import pytest

from m2pt_fast.evaluation.scorers import (
    choice_accuracy,
    choice_correct,
    mm_avg,
    mme_label,
    mme_scores,
    normalize_vqa_answer,
    pope_label,
    pope_scores,
    vqa_accuracy,
)


@pytest.mark.parametrize("prediction, label", [
    ("Yes", "yes"), ("yes", "yes"), ("YES", "yes"), ("Yes.", "yes"), ("yes\n", "yes"),
    ("No, there is not", "no"), ("no", "no"), ("Nope", "no"),
    ("not sure", "no"),  # "no" within the first four characters
    ("The answer is yes", "other"), ("I think yes", "other"), ("", "other"),
])
def test_mme_reads_an_answer_as_its_calculation_does(prediction, label):
    assert mme_label(prediction) == label


def test_mme_scores_acc_acc_plus_and_the_sums():
    rows = [
        # existence: image a both right, image b one right -> acc 75, acc+ 50
        {"category": "existence", "image": "a.jpg", "question": "q1", "answer": "Yes", "prediction": "Yes"},
        {"category": "existence", "image": "a.jpg", "question": "q2", "answer": "No", "prediction": "No."},
        {"category": "existence", "image": "b.jpg", "question": "q1", "answer": "Yes", "prediction": "yes"},
        {"category": "existence", "image": "b.jpg", "question": "q2", "answer": "No", "prediction": "The answer is no"},
        # code_reasoning (cognition): one image, both wrong -> 0, 0
        {"category": "code_reasoning", "image": "c.png", "question": "q1", "answer": "Yes", "prediction": "no"},
        {"category": "code_reasoning", "image": "c.png", "question": "q2", "answer": "No", "prediction": ""},
    ]
    scores = mme_scores(rows)
    assert scores["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert scores["subtasks"]["code_reasoning"] == {"acc": 0.0, "acc_plus": 0.0, "score": 0.0}
    assert (scores["perception"], scores["cognition"], scores["total"]) == (125.0, 0.0, 125.0)
    with pytest.raises(ValueError, match="not among the 14"):
        mme_scores([{**rows[0], "category": "colour"}])


@pytest.mark.parametrize("prediction, label", [
    ("Yes", "yes"), ("Yes, there is a dog.", "yes"), ("No, there is not", "no"), ("No.", "no"),
    ("There is not a dog. Yes.", "no"),  # the first sentence decides
    ("Yes. There is no cat.", "yes"),
    ("The answer is yes", "yes"), ("not sure", "no"),
    ("Not sure", "yes"), ("NO", "yes"), ("no\n", "yes"),  # only "No", "no", "not" as space-split words
    ("", "yes"),
])
def test_pope_reads_an_answer_as_llava_s_script_does(prediction, label):
    assert pope_label(prediction) == label


def test_pope_scores_by_split_with_yes_positive():
    def rows(split, pairs):
        return [{"category": split, "label": t, "prediction": p} for t, p in pairs]

    adversarial = rows("adversarial", [("yes", "Yes"), ("yes", "No"), ("no", "Yes"), ("no", "no"), ("no", "No.")])
    # tp 1, fn 1, fp 1, tn 2: precision 1/2, recall 1/2, f1 1/2, accuracy 3/5, yes_ratio 2/5
    random = rows("random", [("no", "No"), ("yes", "No")])  # nothing predicted yes: precision, recall, f1 are 0
    scores = pope_scores(adversarial + random)
    assert scores["adversarial"] == pytest.approx({"accuracy": 0.6, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                                                   "yes_ratio": 0.4})
    assert scores["random"] == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert scores["mean_f1"] == pytest.approx(0.25)


@pytest.mark.parametrize("text, normalized", [
    ("Two dogs.", "2 dogs"), ("the cat", "cat"), ("dont know", "don't know"), ("Hello, World!", "hello world"),
    ("3.5 m", "3.5 m"), ("yes\n", "yes"), ("coca-cola", "coca cola"), ("1,000", "1000"), ("It's red", "it 's red"),
    ("end.", "end"), ("a-b", "b"), ("(none)", "0"), ("  STOP  ", "stop"),
])
def test_vqa_answers_are_normalized_as_evalai_does(text, normalized):
    assert normalize_vqa_answer(text) == normalized


def test_vqa_accuracy_is_the_leave_one_out_average():
    answers = ["red"] * 3 + ["dark red"] * 5 + ["maroon", "crimson"]
    # "red" 3 times: leaving out a "red" leaves 2 (2/3), leaving out another leaves 3 (1)
    assert vqa_accuracy("Red.", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("maroon", answers) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("dark red", answers) == 1.0
    assert vqa_accuracy("blue", answers) == 0.0
    assert vqa_accuracy("the Red", answers) == vqa_accuracy("red", answers)  # articles and case go
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])


@pytest.mark.parametrize("prediction, target, options, correct", [
    ("Yes", "yes", None, True), ("yes, it is", "yes", None, True), ("yesterday", "yes", None, False),
    ("The answer is cat.", "cat", ["cat", "dog"], True), ("a dog, not a cat", "cat", ["cat", "dog"], False),
    ("Entailment.", "entailment", ["entailment", "neutral", "contradiction"], True),
    ("7", "seven", None, True), ("seven", "7", ["1", "7"], True),
    ("It is a sea lion", "sea lion", ["sea", "sea lion"], True),  # the longest option at one place
    ("", "cat", ["cat"], False),
])
def test_free_form_answers_match_targets_deterministically(prediction, target, options, correct):
    assert choice_correct(prediction, target, options) is correct


def test_choice_accuracy_and_mm_avg():
    rows = [{"prediction": "cat", "target": "cat"}, {"prediction": "dog", "target": "cat"}]
    assert choice_accuracy(rows) == 0.5 and choice_accuracy([]) == 0.0
    # POPE's three splits averaged first, then the mean with the others; MME never counted
    assert mm_avg({"mnist": 0.9, "pope_adv": 0.7, "pope_pop": 0.8, "pope_rand": 0.9, "mme": 1500.0}) \
        == pytest.approx((0.9 + 0.8) / 2)
    with pytest.raises(ValueError):
        mm_avg({"mme": 1.0})
