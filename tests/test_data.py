"""GLUE loaders on the real files: official row counts, label sets, formats; hub mapping."""

from collections import Counter
from pathlib import Path

import pytest

from squat_cli.batching import Collator, EncodedDataset
from squat_cli.data import encode, examples_from_hub_dataset, load_split, read_tsv, subset
from squat_cli.errors import DataError
from squat_cli.glue import PAPER_TASKS, TASKS, get_task

FIXTURES = Path(__file__).parent / "fixtures" / "glue"

OFFICIAL = {
    "cola": (8551, {"dev": 1043}),
    "sst2": (67349, {"dev": 872}),
    "mrpc": (3668, {"dev": 408}),
    "stsb": (5749, {"dev": 1500}),
    "rte": (2490, {"dev": 277}),
    "wnli": (635, {"dev": 71}),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_row_counts_and_labels(full_glue_dir, name):
    glue_dir = full_glue_dir
    task = get_task(name)
    n_train, n_dev = OFFICIAL[name]
    train = load_split(task, "train", glue_dir)
    assert len(train) == n_train
    for split, n in n_dev.items():
        dev = load_split(task, split, glue_dir)
        assert len(dev) == n
    if task.is_regression:
        assert min(train.label) == 0.0 and max(train.label) == 5.0
    else:
        assert set(train.label) == set(range(task.num_labels))
    assert (train.text_b is None) == (task.hub_text_b is None)
    assert all(isinstance(t, str) and t for t in train.text_a[:100])


def test_qnli_dev(full_glue_dir):
    glue_dir = full_glue_dir
    dev = load_split(get_task("qnli"), "dev", glue_dir)
    assert len(dev) == 5463
    assert set(dev.label) == {0, 1}
    assert dev.text_a[0] == "What came into force after the new constitution was herald?"
    assert dev.label[0] == 0  # entailment


def test_known_rows(full_glue_dir):
    glue_dir = full_glue_dir
    cola = load_split(get_task("cola"), "dev", glue_dir)
    assert cola.text_a[0] == "The sailors rode the breeze clear of the rocks." and cola.label[0] == 1
    mrpc = load_split(get_task("mrpc"), "dev", glue_dir)
    assert mrpc.label[0] == 1
    assert mrpc.text_b[0].startswith('" The foodservice pie business')  # quoting off: the quote stays
    stsb = load_split(get_task("stsb"), "dev", glue_dir)
    assert stsb.label[:2] == [5.0, 4.75]
    # label balance of CoLA dev (known: 322 unacceptable, 721 acceptable)
    assert Counter(cola.label) == {0: 322, 1: 721}
    sst = load_split(get_task("sst2"), "dev", glue_dir)
    assert Counter(sst.label) == {0: 428, 1: 444}


def test_mnli_fixture():
    task = get_task("mnli")
    assert task.dev_splits == ("dev_matched", "dev_mismatched")
    train = load_split(task, "train", FIXTURES)
    assert len(train) == 6
    assert train.label == [1, 0, 0, 0, 1, 2]  # neutral, entailment x3, neutral, contradiction (hub order)
    assert train.text_b[0] == "Product and geography are what make cream skimming work. "
    assert train.text_a[5] == 'He said "hi.'  # unbalanced quote kept
    m = load_split(task, "dev_matched", FIXTURES)
    mm = load_split(task, "dev_mismatched", FIXTURES)
    assert m.label == [1, 2, 0]  # gold_label column, not label1
    assert mm.label == [2, 1]


def test_qqp_fixture():
    task = get_task("qqp")
    train = load_split(task, "train", FIXTURES)
    dev = load_split(task, "dev", FIXTURES)
    assert train.label == [0, 1, 0, 1] and dev.label == [0, 0, 1]
    assert dev.text_a[2] == "Is there a reason why we should travel alone?"
    assert task.metric_names() == ("accuracy", "f1")


def test_task_table_matches_paper():
    assert PAPER_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
    assert get_task("cola").main_metric == "matthews_correlation"
    assert get_task("stsb").metric_names() == ("pearson", "spearmanr") and get_task("stsb").is_regression
    assert get_task("mrpc").metric_names() == ("accuracy", "f1")
    assert get_task("mnli").metric_names() == ("accuracy", "accuracy_mm")
    for name in ("sst2", "qnli", "rte"):
        assert get_task(name).metric_names() == ("accuracy",)
    assert get_task("SST-2") is TASKS["sst2"]
    with pytest.raises(DataError, match="unknown task 'foo'; choose one of: cola"):
        get_task("foo")


def test_malformed_row_and_label(tmp_path):
    task = get_task("rte")
    (tmp_path / "RTE").mkdir()
    f = tmp_path / "RTE" / "dev.tsv"
    f.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tnot_entailment\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: expected 4 tab-separated fields, found 3"):
        read_tsv(task, f)
    f.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=r"dev.tsv:2: label 'maybe' is not one of entailment, not_entailment"):
        read_tsv(task, f)
    with pytest.raises(DataError, match=r"train.tsv not found"):
        load_split(task, "train", tmp_path)


@pytest.mark.parametrize("score,message", [("nan", "is outside STS-B's range 0 to 5"), ("inf", "is outside STS-B's range"),
                                           ("1e30", "is outside STS-B's range"), ("-0.5", "is outside STS-B's range"),
                                           ("high", "is not a number")])
def test_stsb_scores_are_validated(tmp_path, score, message):
    f = tmp_path / "dev.tsv"
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    f.write_text(head + "0\tg\tf\t2012\t1\ts\ts\ta b\tc d\t4.2\n" + f"1\tg\tf\t2012\t2\ts\ts\ta\tb\t{score}\n")
    with pytest.raises(DataError, match=rf"dev.tsv:3: label '{score}' {message}"):
        read_tsv(get_task("stsb"), f)


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1", "binary"])
def test_non_utf8_tsv_is_one_clear_error(tmp_path, encoding):
    f = tmp_path / "dev.tsv"
    text = "index\tsentence1\tsentence2\tlabel\n0\tcaf\u00e9 \u00e0\tb\tentailment\n"
    f.write_bytes(bytes(range(256)) * 4 if encoding == "binary" else text.encode(encoding))
    with pytest.raises(DataError, match=r"dev.tsv: not UTF-8 text \(byte \d+\); GLUE's files are UTF-8"):
        read_tsv(get_task("rte"), f)


def _hub_like(task, local):
    """What ``datasets.load_dataset('nyu-mll/glue', cfg)`` returns for these rows (hub column names)."""
    import datasets

    cols = {task.hub_text_a: local.text_a}
    if task.hub_text_b:
        cols[task.hub_text_b] = local.text_b
    cols["label"] = local.label
    cols["idx"] = list(range(len(local)))
    return datasets.Dataset.from_dict(cols)


@pytest.mark.parametrize("name,split", [("cola", "dev"), ("mrpc", "dev"), ("stsb", "dev"), ("rte", "dev")])
def test_hub_and_local_map_to_same_examples(glue_dir, name, split):
    task = get_task(name)
    local = subset(load_split(task, split, glue_dir), 50, None)
    hub = examples_from_hub_dataset(task, _hub_like(task, local))
    assert hub.text_a == local.text_a and hub.text_b == local.text_b and hub.label == local.label


@pytest.mark.parametrize("name", ["mnli", "qqp"])
def test_hub_mapping_fixture_tasks(name):
    task = get_task(name)
    local = load_split(task, "train", FIXTURES)
    hub = examples_from_hub_dataset(task, _hub_like(task, local))
    assert (hub.text_a, hub.text_b, hub.label) == (local.text_a, local.text_b, local.label)


def test_hub_source_uses_hub_split_names(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, config, split):
        calls.append((path, config, split))
        return datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr("squat_cli.data.hub_reachable", lambda timeout=3.0: True)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    ex = load_split(get_task("mnli"), "dev_mismatched", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert ex.label == [2] and ex.text_a == ["p"]


def test_hub_unreachable_is_clear(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("squat_cli.data.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub for nyu-mll/glue; pass --data-dir"):
        load_split(get_task("rte"), "dev", None)


def test_encode_cache_and_dynamic_padding(glue_dir, minilm_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("SQUAT_CACHE_DIR", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    task = get_task("mrpc")
    ex = subset(load_split(task, "dev", glue_dir), 20, None)
    enc = encode(ex, tok, 64, False)
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1
    again = encode(ex, tok, 64, False)
    assert (again.ids == enc.ids).all() and (again.offsets == enc.offsets).all()
    other = encode(ex, tok, 32, False)  # another max length: another cache entry
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    assert int(other.lengths.max()) <= 32 < int(enc.lengths.max())
    ref = tok(ex.text_a[0], ex.text_b[0], truncation=True, max_length=64)
    ds = EncodedDataset(enc)
    assert ds[0]["input_ids"].tolist() == ref["input_ids"]
    assert ds[0]["token_type_ids"].tolist() == ref["token_type_ids"]
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(4)])
    longest = max(len(ds[i]["input_ids"]) for i in range(4))
    assert batch["input_ids"].shape == (4, longest)
    assert batch["attention_mask"].sum(1).tolist() == [len(ds[i]["input_ids"]) for i in range(4)]
    assert batch["labels"].tolist() == ex.label[:4]


def test_embedded_stsb_when_no_folder_and_no_hub(full_glue_dir, monkeypatch, capsys):
    """data.fallback=embedded: no --data-dir, no SQUAT_DATA_DIR, no hub -> the STS-B packaged with squat,
    announced in one line; the same rows as GLUE's files. Without the fallback: the hub error as before."""
    glue_dir = full_glue_dir
    import squat_cli.data as D

    monkeypatch.delenv("SQUAT_DATA_DIR", raising=False)
    monkeypatch.setattr(D, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(D, "_told", set())
    stsb = get_task("stsb")
    path = D.resolve_data_dir(None, "embedded", stsb)
    assert path == D.embedded_data_dir()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "using the STS-B data packaged with squat" in err[0]
    for split, n in (("train", 5749), ("dev", 1500)):
        ours, glue = load_split(stsb, split, path), load_split(stsb, split, glue_dir)
        assert len(ours) == n and ours.fingerprint == glue.fingerprint and ours.label == glue.label
    assert D.resolve_data_dir(None, "none", stsb) is None  # no fallback: the hub is tried (and fails clearly)
    assert D.resolve_data_dir(None, "embedded", get_task("rte")) is None  # only STS-B is packaged
    D.resolve_data_dir(None, "embedded", stsb)
    assert capsys.readouterr().err == ""  # said once
    monkeypatch.setenv("SQUAT_DATA_DIR", str(glue_dir))
    assert D.resolve_data_dir(None, "embedded", stsb) == glue_dir  # a given folder always wins
