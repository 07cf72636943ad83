"""Fine-tuning baselines: FT-L (ROME's constrained fine-tuning) and FT-M (EasyEdit's).

Both train the weight matrix of ``hparams.module`` (the MLP down-projection by default)
at ``hparams.layers`` with Adam, every other parameter frozen, for ``steps`` epochs over
the batch in chunks of ``batch_size`` facts, as ROME's ``baselines/ft/ft_main.py`` does:
a chunk takes a step only while its loss is at least ``stop_loss``, and the epochs stop
once an epoch's mean loss is below it. They differ in the loss:

* **FT-L** (``objective="prompt_last"``): every token of ``" " + target_new`` is scored
  at the prompt's *last* position, ``−mean_t log p(t | prompt)`` (ROME's FT loss: no
  teacher forcing), and after every step each weight is clipped into the box
  ``|W − W₀| ≤ norm_constraint`` (an L∞ constraint around the original weights).
* **FT-M** (``objective="target_new"``): the prompt followed by the target, teacher
  forced, with the cross-entropy masked to the target tokens (EasyEdit's
  ``objective_optimization: target_new``); no norm constraint by default.

Departures from the reference code: the prompt and the target are tokenised separately
and joined (EasyEdit's FT-M tokenises ``prompt + target`` as one string, so tokens can
merge across the boundary; the package's targets and metrics score the separate
tokenisation, see :func:`intattn_analysis.targets.answer_ids`); the target gets one
leading space (EasyEdit always prepends one, even to a target that has one); rows are
right-padded, which needs no attention mask with causal attention (EasyEdit left-pads
FT-M); only the named weight matrix is trained (ROME's ``rewrite_module_tmp`` matches the
bias too, which Llama-family projections do not have).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ...hparams import FTHparams
from ...model_access import initial_loss_scale
from ...targets import Row, answer_ids, pad_rows
from ..protocol import EditJob, Editor, register
from ..result import EditError

__all__ = ["FT_L", "FT_M"]


def _writes(model, hp: FTHparams) -> list[tuple[str, int]]:
    return [(hp.module, l) for l in hp.layers]


def _rows(model, facts, objective: str) -> list[Row]:
    """One row per fact: FT-L scores every target token at the prompt's last position,
    FT-M scores each target token at the position before it."""
    rows = []
    for i, fact in enumerate(facts):
        prompt = model.tokenize(fact.text)[0]
        target = answer_ids(model, fact.target_new)
        n = len(prompt)
        if objective == "prompt_last":
            rows.append(Row(i, tuple(prompt), n - 1, scored=(n - 1,) * len(target), answers=tuple(target)))
        else:
            rows.append(Row(i, tuple(prompt + target[:-1]), n - 1,
                            scored=tuple(range(n - 1, n - 1 + len(target))), answers=tuple(target)))
    return rows


def _loss(model, rows: list[Row]) -> torch.Tensor:
    """Per row, the mean negative log-probability of its answers at its scored positions."""
    ids = pad_rows(model, rows)
    logits = model.bridge(ids)
    device = logits.device
    owner = torch.tensor([j for j, r in enumerate(rows) for _ in r.scored], device=device)
    positions = torch.tensor([p for r in rows for p in r.scored], device=device)
    answers = torch.tensor([a for r in rows for a in r.answers], device=device)
    log_probs = torch.log_softmax(logits[owner, positions].float(), dim=-1)
    token = -log_probs.gather(-1, answers[:, None])[:, 0]
    counts = torch.tensor([len(r.scored) for r in rows], device=device, dtype=token.dtype)
    return torch.zeros(len(rows), device=device, dtype=token.dtype).index_add(0, owner, token) / counts


@torch.no_grad()
def _all_losses(model, rows: list[Row], chunks: list[list[int]]) -> torch.Tensor:
    """Every row's loss under the current weights (the diagnostics' before and after;
    ``p_target`` is ``exp(-loss)``, the geometric mean of the target tokens'
    probabilities, as in the target optimisation's diagnostics)."""
    out = torch.zeros(len(rows))
    for chunk in chunks:
        out[chunk] = _loss(model, [rows[j] for j in chunk]).detach().cpu()
    return out


class _Trained:
    """The trained matrices and what Adam updates: the matrices themselves in float32, and
    float32 master copies of them in half precision (Adam's steps, at a learning rate of
    1e-4 or so, are smaller than half precision's spacing, and its epsilon underflows
    float16). In half precision each step's gradient is read into the masters, the
    masters step, and each is cast once to its matrix's dtype; in float16 the loss is
    scaled before the backward pass so that small gradients do not flush to zero, and a
    step whose scaled gradient overflowed is skipped at half the scale
    (:func:`intattn_analysis.model_access.initial_loss_scale`)."""

    def __init__(self, weights: list[torch.Tensor], dtype: torch.dtype) -> None:
        self.weights = weights
        self.half = any(w.dtype in (torch.float16, torch.bfloat16) for w in weights)
        self.masters = [w.detach().float().clone() for w in weights] if self.half else weights
        self.scale = initial_loss_scale(dtype)

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate ``loss``; whether the masters have a finite gradient to step on."""
        (loss * self.scale if self.scale != 1 else loss).backward()
        if not self.half:
            return True
        grads = [w.grad.float() / self.scale for w in self.weights]  # a power of two: exact
        for w in self.weights:
            w.grad = None
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            if self.scale > 1:
                self.scale /= 2
                return False
            raise EditError("the fine-tuning gradient is not finite even unscaled; lower lr, or load the model "
                            "in bfloat16 or float32")
        for master, grad in zip(self.masters, grads):
            master.grad = grad
        return True

    @torch.no_grad()
    def write(self) -> None:
        """Cast the masters into the matrices (nothing to do in float32: they are the matrices)."""
        if self.half:
            for w, master in zip(self.weights, self.masters):
                w.copy_(master)

    @torch.no_grad()
    def clip(self, originals: list[torch.Tensor], bound: float) -> None:
        """Each entry into ``[w0 - bound, w0 + bound]`` around the original weights."""
        for master, w0 in zip(self.masters, originals):
            w0 = w0.to(master.dtype)
            master.copy_(torch.minimum(torch.maximum(master, w0 - bound), w0 + bound))
        self.write()


def apply(job: EditJob) -> None:
    model, hp = job.model, job.hparams
    keys = _writes(model, hp)
    weights = [model.weight(*key) for key in keys]
    originals = [w.detach().clone() for w in weights]
    rows = _rows(model, job.facts, hp.objective)
    chunks = [list(range(i, min(i + hp.batch_size, len(rows)))) for i in range(0, len(rows), hp.batch_size)]
    flags = {p: p.requires_grad for p in model.hf_model.parameters()}
    initial = _all_losses(model, rows, chunks)  # before any step, every fact
    steps = [0] * len(rows)
    epochs = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        trained = _Trained(weights, model.dtype)
        optimizer = torch.optim.Adam(trained.masters, lr=hp.lr, weight_decay=hp.weight_decay)
        bar = tqdm(range(hp.steps), desc=f"{job.result.method} epochs", disable=not job.progress)
        for epoch in bar:
            total = 0.0
            for chunk in chunks:
                optimizer.zero_grad()
                with torch.enable_grad():
                    per_row = _loss(model, [rows[j] for j in chunk])
                    loss = per_row.mean()
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise EditError(
                            f"the fine-tuning loss became {value} at epoch {epoch}; lower lr "
                            f"(now {hp.lr})"
                        )
                    total += value * len(chunk)
                    if value >= hp.stop_loss and trained.backward(loss):
                        optimizer.step()
                        trained.write()
                        for j in chunk:
                            steps[j] += 1
                if hp.norm_constraint is not None:
                    trained.clip(originals, hp.norm_constraint)
            epochs = epoch + 1
            mean = total / len(rows)
            bar.set_postfix(loss=f"{mean:.3f}")
            if mean < hp.stop_loss:
                break
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for w in weights:
            w.grad = None
    for key in keys:
        job.changed_in_place(key)
    final = _all_losses(model, rows, chunks)  # after the last step, every fact
    for j, fact in enumerate(job.facts):
        job.result.z_diagnostics.append({
            "fact": fact.key, "subject": fact.subject, "target_new": fact.target_new,
            "loss_initial": float(initial[j]), "loss_final": float(final[j]),
            "p_target_before": float(torch.exp(-initial[j])), "p_target_after": float(torch.exp(-final[j])),
            "steps": steps[j], "epochs": epochs,
        })


def _prepare(objective: str):
    def prepare(model, hp: FTHparams, alpha_given: bool):
        if hp.objective != objective:
            raise EditError(
                f"this method trains with objective {objective!r}, the hparams say "
                f"{hp.objective!r}; use method={'ft-l' if hp.objective == 'prompt_last' else 'ft-m'!r}"
            )
        return hp, {}
    return prepare


def _generic(objective: str):
    """The layer at 21/32 of the depth (EasyEdit's Llama layer 21), lr 5e-4, 25 epochs,
    batch size 1; FT-L with ROME's L-inf box of 5e-4, FT-M without one."""

    def rule(n_layers: int):
        chosen = (min(round(n_layers * 21 / 32), n_layers - 1),)
        text = f"layer {chosen[0]} of {n_layers} (EasyEdit's Llama layer 21 of 32, same relative depth)"
        box = 5e-4 if objective == "prompt_last" else None
        return FTHparams(layers=chosen, objective=objective, norm_constraint=box), text

    return rule


FT_L = register(Editor(
    name="ft-l", hparams_type=FTHparams, apply=apply, writes=_writes, uses_templates=False,
    prepare=_prepare("prompt_last"),
    description="FT-L: fine-tune one MLP down-projection, target scored at the prompt's last token, L-inf box",
    reference="Meng et al. 2022 (ROME's FT baseline); kmeng01/rome baselines/ft/ft_main.py",
    label="FT-L",
    generic=_generic("prompt_last"),
))
FT_M = register(Editor(
    name="ft-m", hparams_type=FTHparams, apply=apply, writes=_writes, uses_templates=False,
    prepare=_prepare("target_new"),
    description="FT-M: fine-tune one MLP down-projection on the target tokens (teacher forced, masked)",
    reference="EasyEdit easyeditor/models/ft/ft_main.py, objective_optimization target_new",
    label="FT-M",
    generic=_generic("target_new"),
))
