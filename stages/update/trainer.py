"""The update's trainer: PPO-clip over minibatches of training samples, AdamW with warmup, checkpoint state
(see ``stages.update`` for what one call does)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from maths import policy_loss as pl
from maths.policy_loss import logits_needed, policy_loss, selected_logprobs
from runtime import checkpoint as ckpt
from runtime import progress
from runtime.devices import PeakMemory, resolve_device
from schemas.params.update import UpdateParams
from stages.update import distributed as ddist
from stages.update import prefix as shared
from stages.update.batches import Sample, collate, logprob_gap, minibatches

SUMMED = ("loss", "tokens", "clipped", "approx_kl", "entropy", "grad_norm", "kl_ref", "tis_weight")


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the total L2 norm of the gradients (FSDP2's sharded DTensor gradients included); the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --- the trainer -------------------------------------------------------------------------------------------------------
class Trainer:
    """Policy + optimizer + scheduler + counters; ``update(samples)`` is one call of the update stage's work.

    Calling ``update`` k times in one process equals k stage runs that each load the previous checkpoint
    (the resume-fidelity test checks this). ``world``: this process's rank in a torchrun world (default: one
    process); ``self.model`` is the HF (or peft) model, ``self.train_model`` what training runs through (the DDP
    wrapper, or the FSDP2-sharded model itself).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        params: UpdateParams,
        world: ddist.World | None = None,
    ):
        from runtime import lora

        self.params, self.source = params, ckpt.check_checkpoint(checkpoint_dir)
        self.world = world or ddist.World()
        device, self.amp_dtype = resolve_device(params.device, params.dtype)
        self.device = self.world.device(device)
        state = ckpt.load_trainer_state(self.source)
        if state and state.get("optimizer_pruned") and bool(state.get("lora_base")) == bool(params.lora_rank):
            raise ckpt.CheckpointError(  # flows/prune.py dropped its moments: AdamW cannot continue from it
                f"{self.source}: its optimizer state was pruned (turntree prune); rerun the update that wrote it"
            )
        self.step = int(state["step"]) if state else 0
        self.update_idx = int(state.get("update_idx", 0)) if state else 0
        self.lineage = str(state.get("lineage", self.source)) if state else str(self.source)
        self.lora_base: str | None = None
        if params.lora_rank:
            self.model, self.lora_base = lora.load_lora_policy(self.source, state, params, self.device)
        else:
            if state and state.get("lora_base"):
                raise ckpt.CheckpointError(
                    f"checkpoint {self.source} was trained with LoRA; set lora_rank to continue it, or start a "
                    "full fine-tune from a checkpoint without trainer_state.pt"
                )
            self.model = ckpt.load_model(self.source, device=self.device)
        if params.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.pad_id = int(self.model.config.pad_token_id or 0) if hasattr(self.model, "config") else 0
        if self.lora_base and self.world.distributed and self.world.kind == "fsdp2":
            raise ValueError("LoRA with distributed='fsdp2' is not supported: use distributed='ddp'")
        self.train_model = ddist.wrap(self.model, self.world, self.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=params.lr, betas=params.adam_betas, weight_decay=params.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # Optimizer state continues only within the same kind of training (full vs LoRA parameters).
        same_kind = bool(state and state.get("lora_base")) == bool(params.lora_rank)
        if state and state.get("optimizer") is not None and same_kind:
            self._restore(state)
        self.steps: list[dict[str, float]] = []  # per minibatch of the last update() call (_step_record)
        self.history: list[dict[str, float]] = []  # the same, of every call

    def _lr_factor(self, step: int) -> float:
        w = self.params.warmup_steps
        return 1.0 if w == 0 else min(1.0, (step + 1) / w)

    def _restore(self, state: dict[str, Any]) -> None:
        """Optimizer moments, scheduler position and RNG from a checkpoint; lr / weight decay from params."""
        try:
            ddist.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.world)
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt.CheckpointError(
                f"{self.source}/{ckpt.TRAINER_STATE}: optimizer state does not fit this model ({e})"
            ) from e
        self.scheduler.base_lrs = [self.params.lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g.update(
                initial_lr=self.params.lr, weight_decay=self.params.weight_decay, betas=self.params.adam_betas
            )
            g["lr"] = self.params.lr * self._lr_factor(self.scheduler.last_epoch)
        if "rng" in state:
            ckpt.restore_rng(state["rng"])

    def trainer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "update_idx": self.update_idx,
            "lineage": self.lineage,
            "lora_base": self.lora_base,
            "rng": ckpt.capture_rng(),
        }
        if self.params.save_optimizer_state:
            state["optimizer"] = ddist.optimizer_state(self.model, self.optimizer, self.world)
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def forward(self, model: torch.nn.Module, b: dict[str, torch.Tensor], keep: int = 0) -> torch.Tensor:
        """(B, L, V) logits of a collated micro-batch; ``keep`` > 0: only the last ``keep`` positions'."""
        with self._autocast():
            return model(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                use_cache=False,
                logits_to_keep=keep,
            ).logits

    def token_logp(
        self, model: torch.nn.Module, b: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) log-probs and detached entropies of a micro-batch's trained tokens (0 elsewhere): logits only
        from the first trained position on, log-softmax chunked over those positions (``selected_logprobs``)."""
        keep = logits_needed(b["mask"])
        if self.params.shared_prefix and not self.world.distributed:  # stages.update.prefix
            out = shared.shared_logprobs(model, b, keep, self._autocast)
            if out is not None:
                return out
        return selected_logprobs(self.forward(model, b, keep=keep), b["input_ids"], b["mask"])

    @torch.no_grad()
    def logprobs(self, model: torch.nn.Module, samples: list[Sample]) -> list[torch.Tensor]:
        """(L,) log-probs of each sample under ``model`` (eval mode, no grad), in the order given.

        Distributed: each rank scores its share of the length-sorted samples (padding passes keep FSDP2's
        collectives in step) and the results are gathered to every rank."""
        was_training = model.training
        model.eval()
        out: dict[int, torch.Tensor] = {}
        by = shared.micro_key if self.params.shared_prefix and not self.world.distributed else len
        order = sorted(range(len(samples)), key=lambda i: by(samples[i]))
        size = self.params.micro_batch_size
        for idx in ddist.rank_micro_batches(order, size, self.world, key=lambda i: by(samples[i])):
            b = collate([samples[i] for i in idx or order[:1]], self.device, self.pad_id)
            lp = self.token_logp(model, b)[0].float().cpu()
            for k, i in enumerate(idx or []):
                out[i] = lp[k, : len(samples[i])]
        model.train(was_training)
        out = ddist.all_gather_dict(out, self.world)
        return [out[i] for i in range(len(samples))]

    def update(self, samples: list[Sample], ref_model: torch.nn.Module | None = None) -> dict[str, float]:
        """PPO epochs over ``samples``; returns actor/* and timing/* metrics (means over the minibatches measured).

        ``self.steps`` then holds one record per minibatch of this call (``_step_record``: KL to π_old, clip
        fraction, entropy, grad norm, lr, ... at global step ``step``), ``self.history`` those of every call.
        Early stop (``target_kl``): the first minibatch whose KL to π_old, measured in its own forward pass,
        exceeds ``target_kl`` gets no optimizer step, and neither do the rest of the update's minibatches
        (``actor/early_stopped``, ``actor/early_stop_step``: its index in the update = optimizer steps taken).
        """
        p = self.params
        if p.kl_beta > 0 and ref_model is None:
            raise ValueError("kl_beta > 0 needs a reference model")
        t0 = time.perf_counter()
        first = self._old_logprobs(samples)
        if ref_model is not None:
            for s, lp in zip(samples, self.logprobs(ref_model, samples), strict=True):
                s.ref_logp = lp
        t_old = time.perf_counter() - t0

        sums: dict[str, float] = {}
        n_tokens_seen, steps_before, self.steps = 0, self.step, []
        n_planned = p.ppo_epochs * math.ceil(len(samples) / p.minibatch_size)
        self.model.train()
        t1 = time.perf_counter()
        with PeakMemory(self.device) as mem:
            for epoch in range(p.ppo_epochs):
                for mb_idx in minibatches(
                    len(samples), p, self.update_idx, epoch, [s.group for s in samples]
                ):
                    mb = [samples[i] for i in mb_idx]
                    st = self._optimizer_step(mb, ref_model is not None)
                    if first is not None and first == mb_idx:  # its π_old came from its own forward
                        self._share_old_logprobs(samples, mb_idx)
                    self.steps.append(self._step_record(st, epoch))
                    if self.world.main:
                        progress.report("update", len(self.steps), n_planned, f"loss {st['loss']:.4f}")
                    for k in SUMMED:
                        if k in st:
                            sums[k] = sums.get(k, 0.0) + st[k]
                    n_tokens_seen += sum(len(s) for s in mb)
                    if st["early_stop"]:
                        break
                if self.steps[-1]["early_stop"]:
                    break
        t_train = time.perf_counter() - t1
        metrics = logprob_gap(samples) if p.old_logprobs == "recompute" else {}
        self.history.extend(self.steps)
        self.update_idx += 1
        n_steps, n_measured = self.step - steps_before, len(self.steps)
        tok = max(sums.get("tokens", 0.0), 1.0)
        metrics.update(
            {
                "actor/loss": sums["loss"] / n_measured,
                "actor/clip_frac": sums["clipped"] / tok,
                "actor/approx_kl": sums["approx_kl"] / tok,
                "actor/approx_kl_max": max(r["approx_kl"] for r in self.steps),
                "actor/entropy": sums["entropy"] / tok,
                "actor/grad_norm": sums["grad_norm"] / n_measured,
                "actor/lr": self.optimizer.param_groups[0]["lr"],
                "actor/steps": float(n_steps),
                "actor/steps_planned": float(n_planned),
                "actor/early_stopped": float(n_steps < n_measured),
                "actor/global_step": float(self.step),
                "actor/trained_tokens": tok,
                "actor/tokens_per_s": n_tokens_seen / max(t_train, 1e-9),
                "actor/update_tokens_per_s": n_tokens_seen / max(time.perf_counter() - t0, 1e-9),
                "actor/peak_mem_mb": mem.peak_mb,
                "timing/old_logprobs": t_old,
                "timing/update": time.perf_counter() - t0,
            }
        )
        if "kl_ref" in sums:
            metrics["actor/kl_ref"] = sums["kl_ref"] / tok
        if "tis_weight" in sums:
            metrics["actor/tis_weight_mean"] = sums["tis_weight"] / tok
        if n_steps < n_measured:
            metrics["actor/early_stop_step"] = float(n_steps)
        return metrics

    def _old_logprobs(self, samples: list[Sample]) -> list[int] | None:
        """Fill ``old_logp`` (log π_old, the policy before this update) of every sample but the first minibatch's
        (returned: their π_old is the detached log-prob of their own forward pass, before the first step, so
        no separate pass is needed; None: every sample is filled). ``old_logprobs="rollout"``: the rollout
        engine's log-probs stand in (no pass at all)."""
        p = self.params
        if p.old_logprobs == "rollout":
            for s in samples:
                s.old_logp = s.rollout_logp
            return None
        groups = [s.group for s in samples]
        first = minibatches(len(samples), p, self.update_idx, 0, groups)[0]
        skip = set(first or [])
        rest = [i for i in range(len(samples)) if i not in skip]
        for i, lp in zip(
            rest, self.logprobs(self.model, [samples[i] for i in rest]) if rest else [], strict=True
        ):
            samples[i].old_logp = lp
        for i in skip:
            samples[i].old_logp = None
        return first

    def _share_old_logprobs(self, samples: list[Sample], mb_idx: list[int]) -> None:
        """After the first minibatch: its π_old (filled by each rank's own micro-batches) on every rank."""
        mine = {i: samples[i].old_logp for i in mb_idx if samples[i].old_logp is not None}
        for i, lp in ddist.all_gather_dict(mine, self.world).items():
            samples[i].old_logp = lp

    def _step_record(self, st: dict[str, float], epoch: int) -> dict[str, float]:
        """One minibatch's record, all floats: ``update_idx``, ``epoch``, ``step`` (global optimizer step it
        took, or would have taken), ``lr``, ``grad_norm`` (before clipping), ``clip_frac``, ``loss``, ``tokens``,
        ``early_stop`` (1: its KL exceeded target_kl, no step taken), and the token means ``approx_kl`` (KL to
        π_old before this step), ``entropy``, ``kl_ref`` / ``tis_weight`` when computed."""
        tok = max(st["tokens"], 1.0)
        rec = {"update_idx": float(self.update_idx), "epoch": float(epoch)}
        rec.update(
            {k: st[k] for k in ("step", "lr", "grad_norm", "clip_frac", "loss", "tokens", "early_stop")}
        )
        rec.update({k: st[k] / tok for k in ("approx_kl", "entropy", "kl_ref", "tis_weight") if k in st})
        rec.update(pl.stale_step_record(st))
        return rec

    def _optimizer_step(self, mb: list[Sample], with_ref: bool) -> dict[str, float]:
        """Gradient accumulation over the length-sorted micro-batches of one minibatch, then one AdamW step
        unless the minibatch's KL to π_old exceeds ``target_kl`` (``early_stop`` 1: no step, no counter moves).

        Distributed: this rank's micro-batches of its share of ``mb``; the normalisers are the whole ``mb``'s,
        the loss is × world size (DDP / FSDP2 average gradients over ranks), statistics are summed over ranks.
        """
        p, w = self.params, self.world
        n_tokens = float(sum(s.mask.sum() for s in mb))
        acc = {"loss": 0.0, "tokens": 0.0, "clipped": 0.0, "approx_kl": 0.0, "entropy": 0.0}
        acc.update({"tis_weight": 0.0} if p.tis_cap is not None else {})
        acc.update({"kl_ref": 0.0} if with_ref else {})
        acc.update(pl.STALE_SUMS if any(s.stale for s in mb) else {})  # the same keys on every rank
        self.optimizer.zero_grad(set_to_none=True)
        key = shared.micro_key if p.shared_prefix and not w.distributed else len
        micros = ddist.rank_micro_batches(mb, p.micro_batch_size, w, key=key)
        for j, micro in enumerate(micros):
            b = collate(micro or mb[:1], self.device, self.pad_id)
            with ddist.grad_sync(self.train_model, w, sync=j == len(micros) - 1):
                if micro is None:  # padding pass: same collectives as the other ranks, zero gradient
                    (self.forward(self.train_model, b).float().sum() * 0.0).backward()
                else:
                    self._micro_step(b, micro, n_tokens, float(len(mb)), with_ref, acc)
        is_max = acc.pop("stale_is_max", None)  # a max, not a sum: this rank's
        acc = ddist.all_reduce_sums(acc, w, self.device)  # every rank takes the same early-stop decision
        if is_max is not None:
            acc["stale_is_max"] = is_max
        params = [q for q in self.model.parameters() if q.requires_grad]
        grad_norm = clip_grad_norm(params, p.max_grad_norm)
        kl = acc["approx_kl"] / max(acc["tokens"], 1.0)
        stop = p.target_kl is not None and kl > p.target_kl
        acc.update(
            step=float(self.step), lr=float(self.optimizer.param_groups[0]["lr"]), early_stop=float(stop)
        )
        acc.update(grad_norm=grad_norm, clip_frac=acc["clipped"] / max(acc["tokens"], 1.0))
        if stop:  # this minibatch is already too far from π_old: no step from here
            self.optimizer.zero_grad(set_to_none=True)
            return acc
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {self.step}: the update diverged")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return acc

    def _micro_step(
        self,
        b: dict[str, torch.Tensor],
        micro: list[Sample],
        n_tokens: float,
        n_seqs: float,
        with_ref: bool,
        acc: dict[str, float],
    ) -> None:
        """Loss and backward of one collated micro-batch; its token-summed statistics are added to ``acc``.
        A micro-batch without π_old (the update's first minibatch) takes its own detached log-probs as π_old
        and stores them in its samples."""
        p = self.params
        logp, entropy = self.token_logp(self.train_model, b)
        if "old_logp" not in b:
            b["old_logp"] = logp.detach()
            for k, s in enumerate(micro):
                s.old_logp = b["old_logp"][k, : len(s)].float().cpu().clone()
        loss, st = policy_loss(
            logp,
            b["old_logp"],
            b["advantages"],
            b["mask"],
            loss=p.policy_loss,
            agg=p.loss_agg,
            eps_low=p.clip_eps_low,
            eps_high=p.clip_eps_high,
            kl_beta=p.kl_beta,
            kl_estimator=p.kl_estimator,
            ref_logp=b.get("ref_logp") if with_ref else None,
            rollout_logp=b["rollout_logp"],
            tis_cap=p.tis_cap,
            stale=b["stale"],
            stale_cap=p.stale_is_cap,
            n_tokens=n_tokens,
            n_seqs=n_seqs,
            norm_tokens=float(p.loss_norm_tokens),
        )
        acc["entropy"] += float(entropy.sum())
        (loss * self.world.size).backward()
        acc["loss"] += float(loss.detach())
        for k, v in st.items():
            acc[k] = max(acc.get(k, 0.0), v) if k == "stale_is_max" else acc.get(k, 0.0) + v

    def policy_for_rollout(self) -> torch.nn.Module | None:
        """The plain transformers model the rollout engine should run (LoRA: a merged copy; FSDP2: a gathered
        full copy, on rank 0 only, None elsewhere — collective: every rank calls it)."""
        from runtime import lora

        if self.world.distributed and self.world.kind == "fsdp2":
            return ddist.full_model(self.model, self.world)
        if not self.world.main:
            return None
        return lora.merged_copy(self.model) if self.lora_base else self.model

    def save(self, final: str | Path) -> tuple[Any, torch.nn.Module | None]:
        """Write the checkpoint (rank 0; every rank gets its TableRef); returns (TableRef, the plain model that
        was saved, None on ranks > 0)."""
        plain, state = self.policy_for_rollout(), self.trainer_state()  # both collective under FSDP2
        ref = None
        if self.world.main:
            ref = ckpt.save_checkpoint(
                final,
                plain,
                tokenizer_from=self.source,
                trainer_state=state,
                adapter=self.model if self.lora_base else None,
            )
        return ddist.broadcast(ref, self.world), plain
