"""End-to-end benchmark of one CAP-m training step, capkit's way against the reference's way.

Three variants of the same optimisation step on the same BERT (random weights; the timing does
not depend on them), the same batch and the same sampled negatives:

- ``capkit``: the encoder linears patched with :class:`capkit.nn.MaskedLinear` driven by a
  movement :class:`capkit.pruning.Pruner` (thresholds by selection, recomputed once per step in
  one batch), the three banks (PrC, FiC, SnC with R snapshots) on the training device in 16 bits
  under bf16, the contrastive modules on the fused ``capkit.ops.info_nce``. This is what
  ``capkit-prune --method cap-m`` runs per step (``capkit.cap.trainer``).
- ``reference``: the step written the way the research code wrote it: every forward sorts every
  score matrix to find its top-k mask, computes ``W * M`` and calls ``F.linear``; banks live on
  the CPU in fp32 and the step's candidate rows are gathered there and copied to the device;
  each contrastive loss is ``mm`` + ``log_softmax`` + masked means over the full ``B x M``
  logits (:func:`capkit.ops.info_nce.info_nce_reference`).
- ``kd``: plain knowledge-distillation fine-tuning, the floor CAP adds to: the unpatched dense
  student, the teacher's logits, CE + KD, the optimiser; no masks, no banks.

The teacher's logits: ``--teacher-logits cache`` (default, what ``capkit-prune`` does for
classification) reads them by example id from a table the teacher filled before training, in
``capkit`` and ``kd`` alike, so CAP's overhead over KD is that of its own parts; ``live`` runs
the teacher's forward every step in both. ``reference`` always runs it every step, as the
research code did.

Each step: mask update, teacher forward, student forward (CE + KD), contrastive losses (PrC,
FiC, SnC), backward, AdamW (the trainer's fused one). The variants run interleaved, one step of
each per round, so that the machine's drift falls on all alike; the step time is the median
over ``--steps`` rounds, each step timed end to end (one device synchronisation per step). A
second set of rounds with a synchronisation between phases gives the breakdown (the phases add
up to slightly more than the step: the synchronisations stop the host from running ahead). On
CUDA the first timed step of each variant also records its peak memory above what was
allocated before it. bf16 autocast on CUDA, fp32 on the CPU.

Before timing, the first step's loss of ``capkit`` and ``reference`` is compared (same weights,
batch, dropout seed and negatives): the two ways compute the same loss, so the comparison is of
speed alone.

Shapes: BERT-base (12 layers, 768 hidden, 3072 FFN), batch 32 x 128 tokens, a bank of 8,192
examples, 4,096 extra negatives per bank and step, SnC with 2 snapshots; ``--quick``: 2 layers
of width 128, batch 8 x 32 tokens, 512 examples, 256 negatives.

Usage:
  python -m benchmarks.train_step                 # BERT-base on this device
  python -m benchmarks.train_step --quick         # tiny model (a smoke test)
  python -m benchmarks.train_step --batch 8       # a smaller batch (CPU: a BERT-base step takes seconds)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import machine_info, markdown_table, publish
from capkit.cap.banks import MemoryBank
from capkit.cap.losses import ContrastiveSettings, contrastive_loss, kd_loss, task_loss
from capkit.cap.representations import RepresentationTap
from capkit.cap.trainer import adamw_options
from capkit.nn import prepared_masks
from capkit.ops.info_nce import info_nce_reference
from capkit.pruning import Pruner
from capkit.pruning.topk import kept_count

VARIANTS = ("capkit", "reference", "kd", "capkit-compiled")
# run unless --variants says otherwise ("capkit-compiled": capkit's step with the student under
# torch.compile, its masks prepared ahead of the forward; compiling takes a while, so on request)
DEFAULT_VARIANTS = ("capkit", "reference", "kd")
PHASES = ("mask_update", "teacher_forward", "student_forward", "contrastive", "backward", "optimizer")
BANKS = (("prc", 1), ("fic", 1), ("snc", 2))  # (name, snapshots R)
NUM_LABELS = 2
LINEAR_SUFFIXES = ("attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense", "intermediate.dense", "output.dense")


# -- the reference's masked linear -------------------------------------------------------------
class _SortTopK(torch.autograd.Function):
    """The research code's binariser: sort all scores, keep the top k; straight-through backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: float) -> torch.Tensor:
        flat = scores.flatten()
        order = torch.sort(flat, descending=True).indices
        mask = torch.zeros_like(flat)
        mask[order[: kept_count(flat.numel(), keep)]] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ReferenceMovementLinear(nn.Module):
    """``F.linear(x, W * TopK(S), b)``; the mask is computed by a full sort (``update_mask``)."""

    def __init__(self, linear: nn.Linear, scores: torch.Tensor, keep: float):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.scores = nn.Parameter(scores.detach().clone())
        self.keep = keep
        self.mask: Optional[torch.Tensor] = None

    def update_mask(self) -> None:
        self.mask = _SortTopK.apply(self.scores, self.keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:  # the reference binarised inside every forward
            self.update_mask()
        mask, self.mask = self.mask, None
        return F.linear(x, self.weight * mask, self.bias)


def _encoder_linears(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if ".encoder.layer." in name and name.endswith(LINEAR_SUFFIXES)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# -- set-up --------------------------------------------------------------------------------------
def bert_config(args):
    import transformers

    return transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.ffn, max_position_embeddings=max(512, args.seq),
        num_labels=NUM_LABELS)


def make_inputs(args, device: torch.device, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    ids = torch.randperm(args.bank_examples, generator=generator)[: args.batch]
    return {
        "input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.int64, device=device),
        "labels": torch.randint(0, NUM_LABELS, (args.batch,), generator=generator).to(device),
        "example_id": ids.to(device),
    }


class Step:
    """One variant's state and its step, split into the phases of the breakdown."""

    def __init__(self, variant: str, base: nn.Module, teacher: nn.Module, bank_vectors: Dict[str, torch.Tensor],
                 bank_labels: torch.Tensor, args, device: torch.device,
                 teacher_logits: Optional[torch.Tensor] = None):
        self.variant = variant
        self.device = device
        self.teacher = teacher
        # [bank examples, labels] logits filled by the teacher before training (None: a forward per step)
        self.teacher_logits = teacher_logits if variant != "reference" else None
        self.bf16 = device.type == "cuda" and not args.fp32
        self.settings = ContrastiveSettings(extra_negatives=args.negatives)
        self.student = copy.deepcopy(base).to(device).train()
        scores_gen = torch.Generator().manual_seed(1)
        self.ref_modules: List[ReferenceMovementLinear] = []
        self.pruner = None
        self.compiled = None
        fused = variant in ("capkit", "capkit-compiled")  # capkit's pruner, banks on the device, fused loss
        if fused:
            self.pruner = Pruner(self.student, "movement", keep=args.keep)
            with torch.no_grad():
                for p in self.pruner.score_parameters():  # distinct scores (zeros would all tie)
                    p.copy_(torch.randn(p.shape, generator=scores_gen))
        elif variant == "reference":
            for name, lin in _encoder_linears(self.student).items():
                module = ReferenceMovementLinear(lin, torch.randn(lin.weight.shape, generator=scores_gen), args.keep)
                _set_submodule(self.student, name, module.to(device))
                self.ref_modules.append(module)
        self.tap = RepresentationTap(self.student, "cls")
        if variant == "capkit-compiled":
            self.compiled = torch.compile(self.student)
        # the optimiser capkit's trainer builds (fused AdamW), the same for every variant
        self.optimizer = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=1e-5,
                                           **adamw_options(device))
        # Banks: on the device in the training precision (capkit), on the CPU in fp32 (reference).
        self.banks: Dict[str, MemoryBank] = {}
        if variant != "kd":
            bank_device = device if fused else torch.device("cpu")
            bank_dtype = torch.bfloat16 if (fused and self.bf16) else torch.float32
            for name, snaps in BANKS:
                bank = MemoryBank(name, bank_labels.to(bank_device))
                for r in range(snaps):
                    bank.add(bank_vectors[f"{name}{r}"].to(bank_device, bank_dtype))
                self.banks[name] = bank

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    # phases ------------------------------------------------------------------------------------
    def mask_update(self, state: dict) -> None:
        if self.pruner is not None:  # one batched selection for all matrices
            group = self.pruner.criterion.group
            group.threshold(group.modules[0])
        for m in self.ref_modules:  # a full sort per matrix, as the reference did on every forward
            m.update_mask()

    def teacher_forward(self, state: dict) -> None:
        if self.teacher_logits is not None:
            state["teacher_logits"] = self.teacher_logits[state["batch"]["example_id"]]
            return
        with torch.no_grad(), self.autocast():
            state["teacher_logits"] = self.teacher(input_ids=state["batch"]["input_ids"],
                                                   attention_mask=state["batch"]["attention_mask"]).logits

    def student_forward(self, state: dict) -> None:
        batch = state["batch"]
        with self.autocast():
            if self.compiled is not None:
                with prepared_masks(self.student):
                    out = self.compiled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            else:
                out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        state["loss"] = task_loss(out.logits, batch["labels"]) + kd_loss(out.logits, state["teacher_logits"])

    def contrastive(self, state: dict) -> None:
        if not self.banks:
            return
        batch = state["batch"]
        anchor = self.tap.anchor().float()
        ids, labels = batch["example_id"], batch["labels"]
        self_index = torch.arange(anchor.shape[0], device=self.device)
        loss = state["loss"]
        for name, bank in self.banks.items():
            gen = state["negatives"][name]
            if self.variant != "reference":
                loss = loss + contrastive_loss(anchor, ids, labels, anchor.detach(), ids, labels, bank,
                                               self.settings, gen, self_index=self_index)
            else:
                loss = loss + self._reference_contrastive(anchor, ids, labels, bank, gen, self_index)
        state["loss"] = loss

    def _reference_contrastive(self, anchor, ids, labels, bank: MemoryBank, gen, self_index):
        """Candidates gathered from the CPU bank and copied to the device every step, then the
        loss from the full logits matrix."""
        s = self.settings
        cpu_ids = ids.cpu()
        own_keys, own_ids = bank.keys_of(cpu_ids)
        sampled = bank.sample(s.extra_negatives, gen)
        extra_keys, extra_ids = bank.keys_of(sampled)
        keys = torch.cat([anchor.detach(), own_keys.to(self.device), extra_keys.to(self.device)], 0)
        key_ids = torch.cat([ids, own_ids.to(self.device), extra_ids.to(self.device)], 0)
        key_labels = torch.cat([labels, bank.labels[own_ids].to(self.device), bank.labels[extra_ids].to(self.device)], 0)
        return info_nce_reference(anchor, keys, ids, key_ids, query_labels=labels, key_labels=key_labels,
                                  self_index=self_index, temperature=s.temperature, unsup_weight=s.unsup_weight,
                                  sup_weight=s.sup_weight, normalization=s.normalization)

    def backward(self, state: dict) -> None:
        state["loss"].backward()

    def optimizer_step(self, state: dict) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def phases(self) -> List[Callable[[dict], None]]:
        return [self.mask_update, self.teacher_forward, self.student_forward, self.contrastive, self.backward,
                self.optimizer_step]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state(batch, seed: int) -> dict:
    return {"batch": batch, "negatives": {name: torch.Generator().manual_seed(seed * 31 + i)
                                          for i, (name, _) in enumerate(BANKS)}}


def first_loss(step: Step, batch, seed: int) -> float:
    """The loss of the first step (after the mask update), without updating anything."""
    state = _state(batch, seed)
    torch.manual_seed(seed)  # the same dropout masks in every variant
    for phase in step.phases()[:4]:
        phase(state)
    value = float(state["loss"].detach())
    step.optimizer.zero_grad(set_to_none=True)
    return value


def time_rounds(steps: Dict[str, "Step"], batch, rounds: int, warmup: int, breakdown: bool,
                failures: List[Dict]) -> Dict[str, Dict[str, object]]:
    """Rounds of one step of every variant, interleaved so that the machine's drift (other load,
    clocks) falls on all variants alike. A variant that fails is dropped with its error."""
    totals: Dict[str, List[float]] = {v: [] for v in steps}
    per_phase = {v: {p: [] for p in PHASES} for v in steps}
    peak: Dict[str, float] = {}
    for i in range(warmup + rounds):
        for variant, step in list(steps.items()):
            device = step.device
            timed = i >= warmup
            try:
                state = _state(batch, 1000 + i)
                _sync(device)
                if device.type == "cuda" and i == warmup:
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                for name, phase in zip(PHASES, step.phases()):
                    t = time.perf_counter()
                    phase(state)
                    if breakdown:
                        _sync(device)
                        if timed:
                            per_phase[variant][name].append(time.perf_counter() - t)
                _sync(device)
                if timed:
                    totals[variant].append(time.perf_counter() - t0)
                if device.type == "cuda" and i == warmup:
                    peak[variant] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            except Exception as exc:  # reported, never replaced by a number
                failures.append({"variant": variant, "error": repr(exc)[:300]})
                del steps[variant]
    out: Dict[str, Dict[str, object]] = {}
    for variant in steps:
        t = sorted(totals[variant])
        res: Dict[str, object] = {"median_s": t[len(t) // 2], "min_s": t[0], "max_s": t[-1], "n": len(t)}
        if breakdown:
            res["phases_ms"] = {p: 1e3 * sorted(v)[len(v) // 2] for p, v in per_phase[variant].items()}
        if variant in peak:
            res["step_peak_extra_mib"] = peak[variant]
        out[variant] = res
    return out


def run(args) -> Dict:
    import transformers

    device = torch.device(args.device)
    load_before = os.getloadavg()
    info = machine_info(device)
    torch.manual_seed(0)
    config = bert_config(args)
    base = transformers.BertForSequenceClassification(config)
    teacher = transformers.BertForSequenceClassification(config).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    bank_vectors = {f"{name}{r}": torch.randn(args.bank_examples, args.hidden, generator=gen)
                    for name, snaps in BANKS for r in range(snaps)}
    bank_labels = torch.randint(0, NUM_LABELS, (args.bank_examples,), generator=gen)
    batch = make_inputs(args, device, gen)
    batch["labels"] = bank_labels[batch["example_id"].cpu()].to(device)  # labels consistent with the bank
    cached = None
    if args.teacher_logits == "cache":  # the table the trainer fills before training (this batch's rows)
        cached = torch.zeros(args.bank_examples, NUM_LABELS, device=device)
        with torch.no_grad():
            cached[batch["example_id"]] = teacher(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).logits.float()

    rows: List[Dict] = []
    failures: List[Dict] = []
    losses: Dict[str, float] = {}
    steps: Dict[str, Step] = {}
    for variant in args.variants:
        try:
            step = Step(variant, base, teacher, bank_vectors, bank_labels, args, device, cached)
            if variant != "kd":
                losses[variant] = first_loss(step, batch, seed=7)
            steps[variant] = step
        except Exception as exc:  # reported, never replaced by a number
            failures.append({"variant": variant, "error": repr(exc)[:300]})
    timing = time_rounds(steps, batch, args.steps, args.warmup, False, failures)
    parts = time_rounds(steps, batch, max(1, args.steps // 2), 0, True, failures)
    for variant, step in steps.items():
        t = timing[variant]
        row = {"variant": variant, "step_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3,
               "max_ms": t["max_s"] * 1e3, "n": t["n"], "dtype": "bfloat16 autocast" if step.bf16 else "float32",
               **parts[variant]["phases_ms"]}
        if "step_peak_extra_mib" in t:
            row["step_peak_extra_mib"] = t["step_peak_extra_mib"]
        rows.append(row)
    summary: Dict[str, object] = {}
    # From the medians (what the targets are judged on) and from the fastest steps (on a shared
    # machine the least disturbed ones: a second view of the same comparison).
    for suffix, column in (("", "step_ms"), ("_from_min", "min_ms")):
        by = {r["variant"]: r[column] for r in rows}
        if "capkit" in by and "reference" in by:
            summary["speedup_vs_reference" + suffix] = by["reference"] / by["capkit"]
        if "capkit" in by and "kd" in by:
            summary["overhead_vs_kd" + suffix] = by["capkit"] / by["kd"] - 1.0
        if "capkit" in by and "capkit-compiled" in by:
            summary["compiled_speedup_vs_eager" + suffix] = by["capkit"] / by["capkit-compiled"]
    if "capkit" in losses and "reference" in losses:
        summary["first_loss"] = losses
        summary["loss_rel_diff"] = abs(losses["capkit"] - losses["reference"]) / max(abs(losses["reference"]), 1e-12)
    shape = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "ffn": args.ffn, "batch": args.batch,
             "seq": args.seq, "bank_examples": args.bank_examples, "negatives": args.negatives,
             "banks": {name: snaps for name, snaps in BANKS}, "keep": args.keep, "steps": args.steps,
             "warmup": args.warmup, "teacher_logits": args.teacher_logits}
    return {"benchmark": "train_step", "machine": info, "quick": args.quick, "shape": shape,
            "load_average": {"before": load_before, "after": os.getloadavg()}, "rows": rows, "summary": summary,
            "failures": failures}


def summary_markdown(result: Dict) -> str:
    mi, sh, s = result["machine"], result["shape"], result["summary"]
    lines = [f"# train_step on {mi['device']}", "",
             f"torch {mi['torch']}, triton {mi.get('triton')}, CUDA {mi.get('cuda')}, commit {mi.get('git_commit')}, "
             f"{mi['date']}, {mi['torch_threads']} threads. One CAP-m training step of a BERT with "
             f"{sh['layers']} layers x {sh['hidden']} hidden ({sh['ffn']} FFN), batch {sh['batch']} x {sh['seq']} "
             f"tokens, banks of {sh['bank_examples']} examples (PrC, FiC, SnC x2), {sh['negatives']} extra negatives "
             f"per bank, {100 * (1 - sh['keep']):.0f}% of every encoder matrix masked; teacher logits "
             f"{_TEACHER_TEXT[sh.get('teacher_logits', 'live')]}; the variants interleaved, "
             f"median of {sh['steps']} steps each (ms), phases from further steps with a synchronisation between "
             f"them. 1-minute load average {result['load_average']['before'][0]:.2f} before, "
             f"{result['load_average']['after'][0]:.2f} after.", ""]
    cols = ["variant", "dtype", "step_ms", "min_ms", "max_ms", *PHASES]
    if any("step_peak_extra_mib" in r for r in result["rows"]):
        cols.append("step_peak_extra_mib")
    lines.append(markdown_table(result["rows"], cols))
    lines.append("")
    if "speedup_vs_reference" in s:
        lines.append(f"- capkit against the reference's way: **{s['speedup_vs_reference']:.2f}x** (target >= 1.5x; "
                     f"{s['speedup_vs_reference_from_min']:.2f}x from the fastest steps)")
    if "overhead_vs_kd" in s:
        lines.append(f"- CAP's overhead over plain KD fine-tuning: **{100 * s['overhead_vs_kd']:.1f}%** (target <= 10%; "
                     f"{100 * s['overhead_vs_kd_from_min']:.1f}% from the fastest steps)")
    if "compiled_speedup_vs_eager" in s:
        lines.append(f"- capkit's step with the student under torch.compile against eager: "
                     f"**{s['compiled_speedup_vs_eager']:.2f}x** ({s['compiled_speedup_vs_eager_from_min']:.2f}x from "
                     f"the fastest steps; the compile itself, in the untimed first steps, not counted)")
    rows = {r["variant"]: r for r in result["rows"]}
    if "capkit" in rows and "kd" in rows:  # where CAP's time over plain KD goes, phase by phase
        extra = {ph: rows["capkit"][ph] - rows["kd"][ph] for ph in PHASES}
        total = sum(extra.values())
        parts = ", ".join(f"{ph} {v:+.3g} ms" for ph, v in sorted(extra.items(), key=lambda kv: -kv[1]))
        lines.append(f"- capkit minus plain KD by phase (sum {total:+.3g} ms): {parts}")
    if "loss_rel_diff" in s:
        lines.append(f"- first-step loss, capkit {s['first_loss']['capkit']:.6g} vs reference "
                     f"{s['first_loss']['reference']:.6g} (relative difference {s['loss_rel_diff']:.1e})")
    if result["failures"]:
        lines += ["", "Not measured:", "", markdown_table(result["failures"], ["variant", "error"])]
    return "\n".join(lines) + "\n"


_TEACHER_TEXT = {"cache": "read from a table filled before training in capkit and kd (the reference: a teacher "
                          "forward per step)",
                 "live": "from a teacher forward per step in every variant"}

QUICK = dict(layers=2, hidden=128, heads=2, ffn=512, batch=8, seq=32, bank_examples=512, negatives=256, vocab=1000)
FULL = dict(layers=12, hidden=768, heads=12, ffn=3072, batch=32, seq=128, bank_examples=8192, negatives=4096,
            vocab=30522)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a 2-layer, 128-wide BERT on a small batch")
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"default {FULL[key]} ({QUICK[key]} with --quick)")
    p.add_argument("--keep", type=float, default=0.1, help="kept fraction of every masked matrix (default 0.1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10 on CUDA, 5 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on the CPU)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                   help=f"variants to time (default: {' '.join(DEFAULT_VARIANTS)}; capkit-compiled: capkit's step "
                        f"with the student under torch.compile)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--teacher-logits", choices=("cache", "live"), default="cache",
                   help="capkit and kd read the teacher's logits from a table filled before training (cache, "
                        "what capkit-prune does) or run its forward every step (live); default cache")
    p.add_argument("--min-time", type=float, default=None, help="accepted for the runner; unused (steps are counted)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.batch > args.bank_examples:
        p.error(f"--batch ({args.batch}) cannot exceed --bank-examples ({args.bank_examples})")
    if not 0 < args.keep <= 1:
        p.error(f"--keep must lie in (0, 1], got {args.keep}")
    cuda = torch.device(args.device).type == "cuda"
    args.steps = args.steps or (10 if cuda else (3 if args.quick else 5))
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.steps <= 0 or args.warmup < 0:
        p.error("--steps must be positive and --warmup non-negative")
    result = run(args)
    publish("train_step", torch.device(args.device), result, summary_markdown(result), args.quick, args.out)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
