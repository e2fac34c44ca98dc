"""Parity of capkit's contrastive step with the published CAP code (docs/fidelity.md).

``published_step_loss`` is written from a reading of ``calculate_contrastive_loss`` in the
authors' ``UnstructuredPruning/emmental/modeling_bert_masked.py`` (and its structured twin): the
candidates are laid out as the authors lay them out (per batch example its own detached anchor
followed by its R bank rows, then the sampled examples' rows), the anchor's own copy is pushed to
-1e6 before the log-softmax, positives are found by comparing ids / labels over the whole row,
|P_i| is the number of matches minus one, and the sum is divided by the number of non-zero
masked log-probabilities. capkit builds the same step from its bank, trainer and fused loss; the
two must agree in value and in the gradient on the student representation.
"""
import pytest
import torch
import torch.nn.functional as F

from capkit.cap.banks import MemoryBank
from capkit.cap.losses import ContrastiveSettings, contrastive_loss

from _models import tiny_text_task


def published_step_loss(anchor, idx, labels, bank_rows, bank_labels, extra_idx, *, temperature,
                        unsup_weight, sup_weight):
    """One module's loss as the published code computes it.

    anchor [B, d]: the student's pooled vector after the classifier's dropout (not normalised);
    idx [B]: example ids; labels [B] or None; bank_rows [N, R, d]: the bank (normalised, as the
    authors store it); bank_labels [N]; extra_idx [E // R]: the sampled examples.
    """
    b = anchor.shape[0]
    r, d = bank_rows.shape[1], bank_rows.shape[2]
    z = F.normalize(anchor, p=2, dim=-1)
    own = bank_rows[idx]                                                  # [B, R, d]
    blocks = torch.cat([z.detach().unsqueeze(1), own], 1).reshape(b * (r + 1), d)
    extra = bank_rows[extra_idx].reshape(-1, d)                           # [(E//R) * R, d]
    cand = torch.cat([blocks, extra], 0)
    score = z @ cand.t() / temperature
    self_col = torch.zeros_like(score, dtype=torch.bool)
    self_col[torch.arange(b), torch.arange(b) * (r + 1)] = True           # each anchor's own copy
    score = score.masked_fill(self_col, -1e6)
    lp = torch.log_softmax(score, -1)

    def term(mine, theirs_batch, theirs_extra, weight):
        theirs = torch.cat([theirs_batch.repeat_interleave(r + 1), theirs_extra.repeat_interleave(r)])
        pos = mine[:, None] == theirs[None, :]
        masked = lp.masked_fill(~pos | self_col, 0.0)
        num = pos.sum(1, keepdim=True) - 1
        return -weight * (masked / num).sum() / (masked != 0).sum()

    loss = term(idx, idx, extra_idx, unsup_weight)
    if labels is not None and sup_weight:
        loss = loss + term(labels, labels, bank_labels[extra_idx], sup_weight)
    return loss


def _normalised_rows(bank):
    return F.normalize(torch.stack([s.to(torch.float64) for s in bank.snapshots], 1), dim=-1)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("supervised", [False, True])
def test_contrastive_step_matches_the_published_code_float64(r, supervised):
    g = torch.Generator().manual_seed(10 * r + supervised)
    n, d, extra_negatives = 37, 13, 29
    labels_bank = torch.randint(0, 3, (n,), generator=g)
    bank = MemoryBank("snc", labels_bank)
    for _ in range(r):
        bank.add(torch.randn(n, d, generator=g, dtype=torch.float64))
    sampler = torch.Generator().manual_seed(99)
    extra_idx = torch.randperm(n, generator=torch.Generator().set_state(sampler.get_state()))[:extra_negatives // r]
    # one sampled example is also in the batch, twice (its bank rows then appear three times, all
    # positives); another id repeats within the batch only
    s = int(extra_idx[0])
    other = next(i for i in range(n) if i not in extra_idx.tolist())
    ids = torch.tensor([s, other, 7 if 7 != s else 8, s, 31 if 31 != s else 30, other, 12 if 12 != s else 11])
    raw = torch.randn(len(ids), d, generator=g, dtype=torch.float64)
    settings = ContrastiveSettings(temperature=0.1, extra_negatives=extra_negatives, unsup_weight=0.1,
                                   sup_weight=10.0 if supervised else 0.0)
    labels = labels_bank[ids] if supervised else None

    a_ours = raw.clone().requires_grad_(True)
    ours = contrastive_loss(a_ours, ids, labels, a_ours.detach(), ids, labels, bank, settings, sampler)
    ours.backward()
    a_ref = raw.clone().requires_grad_(True)
    ref = published_step_loss(a_ref, ids, labels, _normalised_rows(bank), labels_bank, extra_idx,
                              temperature=0.1, unsup_weight=0.1, sup_weight=settings.sup_weight)
    ref.backward()
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a_ours.grad, a_ref.grad, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_text_task(tmp_path_factory.mktemp("tiny_fidelity"))


def test_trainer_step_matches_the_published_code(tiny, tmp_path):
    """The trainer's own step (dropout on, PrC + FiC with R = 1 and SnC with R = 3, repeated ids):
    its contrastive parts and their gradient on the anchor equal the published loss of the
    anchor the classifier saw."""
    import transformers

    from capkit.cap.config import CAPConfig
    from capkit.cap.trainer import CAPRun, to_device

    torch.manual_seed(5)
    teacher = transformers.BertForSequenceClassification.from_pretrained(
        tiny / "model", num_labels=3, id2label={0: "fruit", 1: "vehicle", 2: "weather"},
        label2id={"fruit": 0, "vehicle": 1, "weather": 2})
    cfg = CAPConfig(model=str(tiny / "model"), task="text", train_file=str(tiny / "train.csv"),
                    dev_file=str(tiny / "dev.csv"), output_dir=str(tmp_path), batch_size=8, max_length=16,
                    extra_negatives=30, ce_weight=0.0, kd=False, method="cap-m", sparsity=0.5,
                    progress=False, tensorboard=False, eval_batch_size=16, initial_warmup=0.5, final_warmup=0.5)
    run = CAPRun(cfg, teacher=teacher)
    run._setup_teacher()
    run._setup_banks()
    run.total_steps = 20
    run._make_pruner()
    for _ in range(3):
        run._add_snapshot()
    assert {k: b.num_snapshots for k, b in run.banks.items()} == {"fic": 1, "prc": 1, "snc": 3}

    student = run.student.train()  # dropout on, as in training
    order = torch.tensor([7, 3, 40, 7, 0, 21, 3])
    batch = to_device(next(iter(run._loader(run.train_enc, len(order), order))), run.device)
    from capkit.cap.representations import RepresentationTap

    draws = torch.Generator().set_state(run.negatives.get_state())
    with RepresentationTap(student, cfg.representation) as tap:
        total, parts = run._loss(batch, tap)
        anchor = tap.anchor()
        anchor.retain_grad()
        total.backward()
    ids, labels = batch["example_id"], run.example_labels[batch["example_id"]]
    leaf = anchor.detach().double().requires_grad_(True)
    want_total = 0.0
    for name, bank in run.banks.items():  # the trainer's order, one draw per module
        extra_idx = torch.randperm(run.num_examples, generator=draws)[:cfg.extra_negatives // bank.num_snapshots]
        want = published_step_loss(leaf, ids, labels, _normalised_rows(bank), bank.labels, extra_idx,
                                   temperature=0.1, unsup_weight=0.1, sup_weight=10.0)
        assert parts[name] == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6), name
        want_total = want_total + want
    assert set(parts) == {"fic", "prc", "snc"}  # CE and KD off: the total is the three modules
    want_total.backward()
    torch.testing.assert_close(anchor.grad.double(), leaf.grad, rtol=1e-4, atol=1e-6)
