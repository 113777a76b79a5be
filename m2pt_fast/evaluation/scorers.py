"""Scoring zero-shot answers as the official scripts do, on predictions alone.

  mme_scores(rows)            MME, as the MME authors' calculation script computes it
  pope_scores(rows)           POPE, as LLaVA's eval_pope.py parses and counts
  vqa_accuracy(pred, answers) TextVQA's soft accuracy, as LLaVA's m4c evaluator (EvalAI's processing)
  choice_accuracy(rows)       VSR, SNLI-VE, CIFAR-10/100, MNIST and the M²PT held-out tasks: a
                              deterministic match of the free-form answer to the target (below)
  mm_avg(scores)              the paper's MMAvg: the mean of the held-out benchmarks, POPE's splits
                              averaged first, MME reported apart

Every parser follows its script's rules exactly, including where they are surprising (POPE reads "Not
sure" as yes: only "No", "no" and "not" count as no; MME reads only the first four characters).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

from m2pt_fast.errors import UserError

# ----------------------------------------------------------------------------------------------- MME
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(prediction: str) -> str:
    """"yes", "no" or "other", as MME's calculation parses an answer: lower-cased, an exact yes/no,
    else "yes" or "no" (in that order) within its first four characters."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(rows: Iterable[Mapping]) -> dict:
    """rows: {category (the subtask folder), image, question, answer ("Yes"/"No"), prediction}.

    Per subtask: acc (percent of questions right), acc_plus (percent of images with both questions
    right), score = acc + acc_plus. perception and cognition are the sums of their subtasks' scores
    (present ones; at most 2000 and 800), total their sum."""
    by_category: dict[str, list[Mapping]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    subtasks = {}
    for category, items in by_category.items():
        right = [mme_label(r["prediction"]) == r["answer"].lower() for r in items]
        per_image: dict[str, list[bool]] = defaultdict(list)
        for r, ok in zip(items, right):
            per_image[r["image"]].append(ok)
        acc = 100.0 * sum(right) / len(right)
        acc_plus = 100.0 * sum(all(v) for v in per_image.values()) / len(per_image)
        subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks)
    cognition = sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks)
    unknown = sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        raise UserError(f"MME subtasks {unknown} are not among the 14 "
                        f"({', '.join(MME_PERCEPTION + MME_COGNITION)})")
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "subtasks": subtasks}


# ---------------------------------------------------------------------------------------------- POPE
POPE_SPLITS = ("adversarial", "popular", "random")


def pope_label(prediction: str) -> str:
    """"yes" or "no", as LLaVA's eval_pope.py reads an answer: its first sentence (up to the first
    "."), commas dropped, split on spaces; "No", "no" or "not" among the words is no, else yes."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def pope_scores(rows: Iterable[Mapping]) -> dict:
    """rows: {category (adversarial | popular | random), label ("yes"/"no"), prediction}.

    Per split, as fractions with yes the positive class: accuracy, precision, recall, f1, and
    yes_ratio (the share of predictions that are yes, as LLaVA counts it). mean_f1 over the splits
    present. Where a split has no predicted (or no actual) yes, precision (or recall) is 0 (LLaVA's
    script divides by zero there)."""
    by_split: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for row in rows:
        by_split[row["category"]].append((row["label"].strip().lower() == "yes",
                                          pope_label(row["prediction"]) == "yes"))
    scores = {}
    for split, pairs in by_split.items():
        tp = sum(t and p for t, p in pairs)
        fp = sum(p and not t for t, p in pairs)
        fn = sum(t and not p for t, p in pairs)
        tn = len(pairs) - tp - fp - fn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[split] = {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
                         "yes_ratio": (tp + fp) / len(pairs)}
    scores["mean_f1"] = sum(s["f1"] for s in scores.values()) / len(by_split) if by_split else 0.0
    return scores


# -------------------------------------------------------------------------------- VQA (EvalAI rules)
# EvalAI's answer normalisation tables: number words, articles, and contractions.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The contractions as they should read ...
_CANONICAL = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't
shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're
they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've
""".split()
# ... and the typed forms EvalAI maps to them (its keys; each reads as the canonical form with the
# same letters, but "somebody'd", which EvalAI maps to "somebodyd")
_TYPED = """
aint arent cant couldve couldnt couldn'tve couldnt've didnt doesnt dont hadnt hadnt've hadn'tve hasnt havent
hed hed've he'dve hes howd howll hows Id've I'dve Im Ive isnt itd itd've it'dve itll let's maam mightnt
mightnt've mightn'tve mightve mustnt mustve neednt notve oclock oughtnt ow's'at 'ows'at 'ow'sat shant shed've
she'dve she's shouldve shouldnt shouldnt've shouldn'tve somebody'd somebodyd've somebody'dve somebodyll
somebodys someoned someoned've someone'dve someonell someones somethingd somethingd've something'dve
somethingll thats thered thered've there'dve therere theres theyd theyd've they'dve theyll theyre theyve twas
wasnt wed've we'dve weve werent whatll whatre whats whatve whens whered wheres whereve whod whod've who'dve
wholl whos whove whyll whyre whys wont wouldve wouldnt wouldnt've wouldn'tve yall yall'll y'allll yall'd've
y'alld've y'all'dve youd youd've you'dve youll youre youve
""".split()


def _contraction_table() -> dict[str, str]:
    canonical = {word.replace("'", ""): word for word in _CANONICAL}
    table = {typed: canonical[typed.replace("'", "")] for typed in _TYPED if typed != "somebody'd"}
    table["somebody'd"] = "somebodyd"  # EvalAI's entry, as it has it
    return table


CONTRACTIONS = _contraction_table()
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # EvalAI's pattern as written (its look-behind is a typo)


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI's answer processing, in its order: lower-case, "," and "?" removed and "'s" split off,
    whitespace trimmed; each punctuation mark removed (when it touches a space, or the text has a
    comma between digits) or else made a space; periods not before a digit removed (at most 32, as
    EvalAI's call passes re.UNICODE as the count); number words to digits, articles dropped, and
    contractions given their apostrophes."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    source = text
    for mark in _PUNCTUATION:
        if mark + " " in source or " " + mark in source or _DIGIT_COMMA.search(source):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text, count=int(re.UNICODE))
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA's (VQA's) soft accuracy of one prediction against its human answers (10 of them): both
    normalized; for each answer left out in turn, min(1, matches among the others / 3), averaged."""
    if not answers:
        raise UserError("vqa_accuracy needs the human answers (TextVQA gives 10 per question)")
    pred = normalize_vqa_answer(prediction)
    normalized = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for left_out in range(len(normalized)):
        matches = sum(1 for i, a in enumerate(normalized) if i != left_out and a == pred)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------- free-form vs target
def choice_correct(prediction: str, target: str, options: Iterable[str] | None = None) -> bool:
    """Whether a free-form answer gives `target`, deterministically: both normalized as VQA answers
    are; right when they are equal, or when the prediction starts with the target as whole words
    ("yes, it is" for "yes"); with `options` (the task's answer set), the option that occurs first in
    the prediction, as whole words (the longest at one place), must be the target."""
    pred, want = normalize_vqa_answer(prediction), normalize_vqa_answer(target)
    if pred == want:
        return True
    if options is None:
        return pred.startswith(want + " ") if want else False
    words = pred.split()
    candidates = sorted({normalize_vqa_answer(o) for o in options} - {""}, key=lambda o: -len(o.split()))
    for start in range(len(words)):
        for option in candidates:
            size = len(option.split())
            if words[start:start + size] == option.split():
                return option == want
    return False


def choice_accuracy(rows: Iterable[Mapping], options: Iterable[str] | None = None) -> float:
    """rows: {prediction, target}; the fraction choice_correct (0.0 for no rows)."""
    results = [choice_correct(r["prediction"], r["target"], options) for r in rows]
    return sum(results) / len(results) if results else 0.0


# ------------------------------------------------------------------------------------------- MMAvg
MM_AVG_BENCHMARKS = ("text_vqa", "visual_spatial_reasoning", "snli_ve_classification", "cifar_10", "cifar_100",
                     "mnist", "pope")


def mm_avg(accuracies: Mapping[str, float]) -> float:
    """The paper's MMAvg: the mean accuracy over its held-out benchmarks present in `accuracies`
    (fractions); POPE as the mean of pope_adv, pope_pop and pope_rand where given split by split.
    MME is reported apart and never enters it."""
    values = dict(accuracies)
    splits = [values.pop(k) for k in ("pope_adv", "pope_pop", "pope_rand") if k in values]
    if splits and "pope" not in values:
        values["pope"] = sum(splits) / len(splits)
    present = [values[k] for k in MM_AVG_BENCHMARKS if k in values]
    if not present:
        raise UserError(f"mm_avg needs at least one of {MM_AVG_BENCHMARKS}")
    return sum(present) / len(present)
