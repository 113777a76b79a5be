"""M²PT training recipe: prompts in every vision and decoder layer + the projector, backbone frozen.

    deepspeed m2pt_fast/train.py --ds_config ds.json [options]        # one GPU or many
    torchrun --nproc_per_node 2 m2pt_fast/train.py --ds_config configs/zero2.json
    python m2pt_fast/train.py [options]                               # one process, no launcher

With no --model_name_or_path and no --data_path it trains the embedded default: a tiny LLaVA with
random weights on synthetic rendered-image instructions, with a tokenizer built locally (about a
minute on a 2-core CPU). `--config recipe.yaml` takes the same options as keys (configs/*.yaml).

Shape of the recipe: setup (distributed, model, data, engine, resume) -> train (one _loss_step per
micro-batch, DeepSpeed steps at accumulation boundaries) -> cleanup (barrier, destroy the group).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from m2pt_fast import compat, trainable_report
from m2pt_fast.data import (
    ConversationEncoder,
    EpochShardSampler,
    ImagePreprocessor,
    LlavaJsonDataset,
    SampleBuilder,
    SyntheticInstructDataset,
    check_images_decode,
    load_llava_records,
    longest_sample,
    make_collate,
)
from m2pt_fast.data.chat_records import ChatDataset, load_chat_records, make_chat_collate
from m2pt_fast.data.chat_template import ChatTemplateEncoder
from m2pt_fast.errors import UserError
from m2pt_fast.method.methods import OUTPUT_NAMES, apply_method, check_method, save_output, trainable_parameters
from m2pt_fast.models.base_model import load_base
from m2pt_fast.planning import plan
from m2pt_fast.training.checkpoints import (
    STATE_TAG,
    WRITE_ERRORS,
    Checkpointer,
    OutputDirLock,
    WriteFailed,
    load_rng,
    remove_path,
    replace_path,
    rng_state,
    truncate_metrics,
)
from m2pt_fast.training.config import TrainConfig, parse_args, to_dict
from m2pt_fast.training.ds_config import load_ds_config, offloads_optimizer, resolve_ds_config, zero_stage
from m2pt_fast.training.master_weights import fp32_master_values
from m2pt_fast.training.reporting import MetricsReport, check_installed
from m2pt_fast.training.runner_watch import watch_runner

log = logging.getLogger(__name__)
# what a batch hands the model: LLaVA's four, and the Qwen-VL models' image grids and token types
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids")

def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """The factor on --learning_rate for optimizer step `step` (0-based), as transformers defines them."""
    if kind != "constant" and step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    import resource  # Unix only: imported where the CPU's peak is asked for

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_rss"  # ru_maxrss is KiB on Linux


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NonFiniteLoss(RuntimeError):
    pass


class M2PTRecipe:
    """One training run: `setup()`, `train()`, `cleanup()`."""

    def __init__(self, config: TrainConfig):
        self.cfg = config
        self.output_dir = Path(config.output_dir)
        self.global_step = 0
        self.report: MetricsReport | None = None  # rank 0's, from _setup_outputs

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        self._setup_distributed()
        self._setup_precision()
        self._setup_model()
        self._setup_data()
        wanted = self.cfg.estimate_memory if self.cfg.estimate_memory is not None else self.device.type == "cuda"
        if wanted and self.rank == 0 and self.cfg.family != "llava":
            log.info("no memory estimate: the planner counts LLaVA models only so far")
        elif wanted and self.rank == 0:  # every rank holds the same model: one count, one line
            self._log_memory_estimate()
        self._setup_engine()
        self._setup_outputs()

    def _setup_distributed(self) -> None:
        try:
            import deepspeed
        except ImportError as e:
            raise UserError("the trainer runs on DeepSpeed, which is not installed: "
                            "DS_BUILD_OPS=0 pip install deepspeed (bash setup.sh does it)") from e
        from deepspeed.utils import logger as deepspeed_logger

        deepspeed_logger.setLevel(logging.WARNING)  # its per-step INFO lines would bury the progress bar
        # DeepSpeed's ZeRO code calls a torch.distributed function torch has deprecated; not ours to fix
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

        # Without a launcher, act as rank 0 of 1 so the same DeepSpeed path runs everywhere.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader's workers fork after tokenizing
        on_gpu = torch.cuda.is_available()
        local_rank = int(os.environ["LOCAL_RANK"])
        if on_gpu:
            # A launcher that gives each process one GPU (CUDA_VISIBLE_DEVICES per rank) leaves
            # LOCAL_RANK past the visible count: the rank's GPU is then the only one it sees.
            local_rank %= torch.cuda.device_count()
            torch.cuda.set_device(local_rank)
        else:
            compat.deepspeed_cpu_comm_without_shm()
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", dist_init_required=True)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
        if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
            # Processes on one machine share its cores; oversubscribing them slows every rank.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        logging.basicConfig(
            level=logging.INFO if self.rank == 0 else logging.ERROR,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
        )

    def _setup_precision(self) -> None:
        """Compute dtype, backbone format and the DeepSpeed config: every refusal before any work."""
        cfg = self.cfg
        # bf16 also runs on the CPU (DeepSpeed's CPU accelerator, gloo); fp32 stays the default there.
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else self.device.type == "cuda"
        self.quant = cfg.quant or ("bf16" if self.bf16 else "fp32")
        if self.quant == "bf16" and not self.bf16:
            raise UserError("--quant bf16 keeps the backbone in bf16, which needs bf16 compute: add --bf16 "
                            "(the default on a GPU), or use --quant fp32 or --quant nf4")
        where = cfg.ds_config or "the built-in ZeRO-0 DeepSpeed config"
        resolved = dataclasses.replace(cfg, quant=self.quant)
        self.ds_config = resolve_ds_config(load_ds_config(cfg.ds_config), resolved, self.world_size, self.bf16, where)
        self.zero_stage = zero_stage(self.ds_config)
        check_method(cfg.method, cfg.num_vision_prompts, cfg.num_text_prompts, quant=self.quant,
                     tune_lm_head=cfg.tune_lm_head)

    def base_llava(self):
        """The frozen LLaVA this run starts from, built or loaded as the options say (sets self.tokenizer).

        Deterministic: calling it again gives the same weights (what an output is loaded back onto)."""
        llava, self.tokenizer = load_base(self.cfg, self.device, self.bf16, self.quant)
        return llava

    def _setup_model(self) -> None:
        cfg = self.cfg
        llava = self.base_llava()
        torch.manual_seed(cfg.seed)  # the prompts' initial values, the same on every rank
        backend = "fused" if cfg.backend == "auto" else cfg.backend
        self.model = apply_method(
            llava, cfg.method, num_vision_prompts=cfg.num_vision_prompts, num_text_prompts=cfg.num_text_prompts,
            tune_projector=cfg.tune_projector, tune_lm_head=cfg.tune_lm_head, backend=backend, lora=cfg.lora,
        )
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        if cfg.family != "llava":  # the chat-template models: their own image processor, as saved
            self.preprocess = compat.load_image_processor(cfg.processor_dir)
        elif cfg.embedded_model:
            self.preprocess = ImagePreprocessor.clip_default(self.model.image_size, cfg.aspect_ratio)
        else:
            self.preprocess = ImagePreprocessor.from_model_dir(cfg.processor_dir, self.model.image_size,
                                                               cfg.aspect_ratio)
        self.parameter_report = trainable_report(self.model)
        log.info("method %s, backend %s, %s backbone\n%s", cfg.method, self.model.backend, self.quant,
                 self.parameter_report)

    def _log_memory_estimate(self) -> None:
        """The planner's count (m2pt_fast.plan) for this run's model and options, on meta: seconds.
        Samples are taken as long as the data's longest, as many labelled as its most (--data_path),
        or --model_max_length tokens, every text token labelled (the embedded set)."""
        cfg = self.cfg
        tokens, answers = self.longest_sample or (cfg.model_max_length, None)
        report, extra = plan.estimate_run(
            self.model.llava.config, micro_batch=cfg.per_device_train_batch_size,
            checkpointing=cfg.gradient_checkpointing, model_max_length=tokens, answer_tokens=answers,
            deepspeed=self.bf16,
            quant=self.quant, dtype=torch.bfloat16 if self.bf16 or self.quant == "bf16" else torch.float32,
            method=cfg.method, num_vision_prompts=cfg.num_vision_prompts, num_text_prompts=cfg.num_text_prompts,
            backend=self.model.backend, tune_projector=cfg.tune_projector, tune_lm_head=cfg.tune_lm_head,
            lora=cfg.lora,
        )
        of = f" (the longest in --data_path, {answers} labelled)" if self.longest_sample else ""
        log.info("memory estimate: a step of %d samples x %d tokens%s (checkpointing %s) peaks at %s per "
                 "device (counted on meta%s; the table: python -m m2pt_fast.plan)", cfg.per_device_train_batch_size,
                 tokens, of, "on" if cfg.gradient_checkpointing else "off", plan.size(report.peak_bytes + extra),
                 f", {plan.size(extra)} of it DeepSpeed's fp32 state of the trained parameters" if extra else "")

    def _chat_data(self):
        """(dataset, collate) of HF "messages" records through the model's chat template (Qwen-VL)."""
        cfg = self.cfg
        encoder = ChatTemplateEncoder(self.tokenizer, self.preprocess, max_length=cfg.model_max_length)
        records = load_chat_records(cfg.data_path, cfg.image_folder)
        return ChatDataset(records, encoder), make_chat_collate(self.tokenizer.pad_token_id)

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.skipped_at_start = 0
        self.longest_sample = None  # (tokens, labelled) of the data's longest sample
        if cfg.family != "llava":
            dataset, collate = self._chat_data()
            self._setup_loader(dataset, collate)
            return
        encoder = ConversationEncoder(
            self.tokenizer, self.model.image_token_id, self.model.image_seq_length, cfg.model_max_length,
            version=cfg.version,
        )
        build = SampleBuilder(encoder, self.preprocess)
        if cfg.data_path:
            records, report = load_llava_records(cfg.data_path, cfg.image_folder, encoder, progress=self.rank == 0)
            self.skipped_at_start = report.total
            failed = check_images_decode(records, build)
            if failed and self.rank == 0:
                log.warning("%d of the images checked before training do not decode: their records will be "
                            "skipped as training meets them", failed)
            dataset = LlavaJsonDataset(records, build)
            self.longest_sample = longest_sample(records)
        else:
            dataset = SyntheticInstructDataset(cfg.num_synthetic_samples, cfg.seed, build)
        self._setup_loader(dataset, make_collate(self.tokenizer.pad_token_id))

    def _setup_loader(self, dataset, collate) -> None:
        cfg = self.cfg
        self.sampler = EpochShardSampler(
            len(dataset), self.world_size, self.rank, cfg.seed, cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps,
        )
        self.loader = DataLoader(
            dataset, batch_size=cfg.per_device_train_batch_size, sampler=self.sampler, drop_last=True,
            num_workers=cfg.dataloader_num_workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating an iterator must not draw from the global RNG (resume equality)
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.gradient_accumulation_steps
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        log.info("%d samples, %d optimizer steps per epoch, %d steps in all",
                 len(dataset), self.steps_per_epoch, self.total_steps)

    def _setup_engine(self) -> None:
        import deepspeed

        cfg = self.cfg
        params = trainable_parameters(self.model)
        if offloads_optimizer(self.ds_config) and self.device.type == "cuda":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        # Read at every step: a resumed run with more steps moves total_steps and keeps the warmup it had.
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, self.warmup_steps, self.total_steps, cfg.lr_scheduler_type)
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config,
            dist_init_required=False,
        )
        if self.scheduler is not schedule:
            raise RuntimeError("DeepSpeed replaced the learning-rate schedule; remove 'scheduler' from the config")
        self._undo_optimizer_warmup_step()

    def _undo_optimizer_warmup_step(self) -> None:
        """Under ZeRO-0 in bf16, forget the AdamW step DeepSpeed takes on zero gradients at start.

        DeepSpeed wraps the optimizer in FP16_UnfusedOptimizer there, whose constructor
        (initialize_optimizer_states) steps it once to create its state: AdamW's step count would
        run one ahead (every bias correction off: the embedded model's step-2 loss was 4.52 where
        ZeRO-1's is 4.44), and weight decay would already have shrunk the fp32 masters once.
        The masters were cloned from the bf16 parameters, so copying those back restores them exactly.
        """
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        if not isinstance(self.optimizer, FP16_UnfusedOptimizer):
            return
        self.optimizer.optimizer.state.clear()  # AdamW creates fresh state at its first real step
        with torch.no_grad():
            for low_group, master_group in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups):
                for low, master in zip(low_group, master_group):
                    master.copy_(low)

    def _setup_outputs(self) -> None:
        cfg = self.cfg
        self.metrics_path = self.output_dir / "metrics.jsonl"
        # what each checkpoint holds besides DeepSpeed's state: the method's output, but a whole
        # model's (full fine-tuning: DeepSpeed's state holds those weights already). Before the first
        # checkpoint, one is about the tuned tensors with their optimizer state (fp32 value, Adam's two
        # moments; bf16 adds a master copy) and DeepSpeed's helper scripts.
        tuned = sum(p.numel() for p in trainable_parameters(self.model))
        self.checkpointer = Checkpointer(
            self.output_dir, self.rank, self.world_size, self.device,
            output_name=None if cfg.method == "full" else OUTPUT_NAMES[cfg.method], keep=cfg.save_total_limit,
            first_bytes=tuned * (16 if self.bf16 else 12) + 128 * 2**10)
        start = self.checkpointer.start(cfg.resume)
        if start is not None:
            self._resume(*start)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:
                self.metrics_path.write_text("")
            run = {"config": to_dict(cfg), "deepspeed": self.ds_config, "world_size": self.world_size,
                   "total_steps": self.total_steps, "quant": self.quant, "backend": self.model.backend,
                   "method": cfg.method, "trainable_parameters": self.parameter_report.trainable,
                   "total_parameters": self.parameter_report.total}
            (self.output_dir / "run_config.json").write_text(json.dumps(run, indent=2) + "\n")
            if cfg.embedded_model:
                self.tokenizer.save_pretrained(self.output_dir / "tokenizer")
            self.report = MetricsReport(self.output_dir, self.metrics_path, cfg.reporters, cfg.run_name, run)
            for where in self.report.locations:
                log.info("reporting to %s", where)
        dist.barrier()

    def _run_signature(self) -> dict:
        """What must match for a checkpoint to continue this run bit for bit."""
        cfg = self.cfg
        return {"world_size": self.world_size, "per_device_train_batch_size": cfg.per_device_train_batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "seed": cfg.seed,
                "steps_per_epoch": self.steps_per_epoch}

    def _resume(self, step: int, path: Path) -> None:
        _, client = self.engine.load_checkpoint(
            str(path), tag=STATE_TAG, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        saved = client.get("signature", {})
        mismatched = {k: (saved.get(k), v) for k, v in self._run_signature().items() if saved.get(k) != v}
        if mismatched:
            raise UserError(f"{path} comes from a run with other settings ({{name: (saved, now)}}: {mismatched}); "
                            "resume with the same options and number of processes")
        if step >= self.total_steps:
            raise UserError(f"{path} is at step {step} and this run has {self.total_steps} steps: it is done. Give "
                            "a larger --max_steps (or --num_train_epochs) to train it further")
        load_rng(path, self.rank, self.world_size)
        saved_total = client.get("total_steps", saved.get("total_steps"))
        moved = saved_total is not None and saved_total != self.total_steps
        if moved:
            # the schedule stretches to the new end from where it is; its warmup stays the one that ran
            self.warmup_steps = client.get("warmup_steps", self.warmup_steps)
            log.warning("the learning-rate schedule continues to the new end: step %d of %d (the checkpoint's run "
                        "had %d steps)", step, self.total_steps, saved_total)
        saved_lr = self.scheduler.base_lrs[0]
        if saved_lr != self.cfg.learning_rate:
            # e.g. after a non-finite loss: the new rate takes over the schedule from the resumed step on
            log.warning("--learning_rate %g replaces the checkpoint's %g from step %d on",
                        self.cfg.learning_rate, saved_lr, step + 1)
            self.scheduler.base_lrs = [self.cfg.learning_rate] * len(self.scheduler.base_lrs)
        if moved or saved_lr != self.cfg.learning_rate:
            for group, base, multiplier in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs,
                                               self.scheduler.lr_lambdas):
                group["lr"] = base * multiplier(self.scheduler.last_epoch)
        self.global_step = step
        if self.rank == 0:
            truncate_metrics(self.metrics_path, step)
        log.info("resumed from %s (step %d of %d)", path, step, self.total_steps)

    # ------------------------------------------------------------------------------------- train
    def _loss_step(self, batch: dict) -> torch.Tensor:
        """Forward one micro-batch; the loss is the mean over its answer tokens."""
        inputs = {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
        if self.bf16 and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        output = self.engine(**inputs)
        return output.loss

    def _all_finite(self, loss: torch.Tensor) -> bool:
        # Every rank must take the same decision, or the ones that go on would wait forever.
        flag = torch.isfinite(loss.detach()).float().reshape(1)  # on the loss's device: NCCL needs CUDA tensors
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def train(self) -> int:
        """Train to the last step; returns the process exit code (0, or 1 after a non-finite loss)."""
        cfg, engine = self.cfg, self.engine
        accumulation = cfg.gradient_accumulation_steps
        epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
        progress = tqdm(total=self.total_steps, initial=self.global_step, disable=self.rank != 0,
                        desc=cfg.method, unit="step", dynamic_ncols=True)
        # per optimizer step: [loss sum over micro-batches, tokens, samples, skipped records]
        totals = torch.zeros(4, dtype=torch.float64)
        if self.device.type == "cuda":
            # peak_mem_mb is training memory: not the float model that quantize_model already freed
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        # A checkpoint due after step k is written only once step k+1's first loss is finite: an update
        # that blew the prompts up (finite, but ~1e30) shows only in the next loss, and a checkpoint of
        # it would be a dead end to resume from. The RNG state is taken at the step boundary.
        pending_rng = None
        try:
            while self.global_step < self.total_steps:
                self.sampler.set_position(epoch, step_in_epoch * accumulation)
                for micro, batch in enumerate(self.loader):
                    loss = self._loss_step(batch)
                    if not self._all_finite(loss):
                        raise NonFiniteLoss(f"non-finite loss at step {self.global_step + 1}")
                    if pending_rng is not None:  # the state of the step boundary, unchanged so far
                        self._save_checkpoint(pending_rng)
                        pending_rng = None
                    engine.backward(loss)
                    lr = self.optimizer.param_groups[0]["lr"]
                    boundary_norm = self._local_grad_norm() if (micro + 1) % accumulation == 0 else None
                    engine.step()
                    for reason in batch["skipped"]:
                        log.warning("skipped a bad record: %s", reason)
                    totals += torch.tensor([loss.item(), batch["attention_mask"].sum().item(),
                                            batch["input_ids"].shape[0], len(batch["skipped"])], dtype=torch.float64)
                    if (micro + 1) % accumulation:
                        continue
                    self.global_step += 1
                    started = self._log_step(totals, lr, boundary_norm, started, epoch, progress)
                    totals.zero_()
                    last = self.global_step >= self.total_steps  # the final step writes the prompt file instead
                    if cfg.save_steps and self.global_step % cfg.save_steps == 0 and not last:
                        pending_rng = rng_state()
                    if self.global_step >= self.total_steps:
                        break
                epoch, step_in_epoch = epoch + 1, 0
            # The end of a run leaves a checkpoint, so --resume with a larger --max_steps trains it further;
            # but not a full fine-tuning run's unasked (it would hold the whole model's optimizer state).
            ended_with_checkpoint = bool(cfg.save_steps) or cfg.method != "full"
            if ended_with_checkpoint:
                try:
                    self._save_checkpoint(rng_state())
                except WriteFailed as e:
                    if cfg.save_steps:
                        raise
                    ended_with_checkpoint = False  # not asked for: the run's output still comes next
                    if self.rank == 0:
                        log.warning("%s; the prompt file comes next, but --resume cannot continue this run", e)
            elif self.rank == 0:
                log.info("--method full with --save_steps 0 leaves no checkpoint; to train further later, give "
                         "--save_steps")
        except WriteFailed as e:
            if self.rank == 0:
                log.error("%s", e)
            progress.close()
            return 1
        except NonFiniteLoss as e:
            found = self.checkpointer.newest()
            if self.rank == 0:
                if found:
                    log.error("%s: stopping; the last good checkpoint is %s (the loss after it was finite). "
                              "Lower --learning_rate or check the data, then --resume.", e, found[1])
                else:
                    log.error("%s: stopping; no checkpoint was written (none was followed by a finite loss). "
                              "Lower --learning_rate or check the data, then start again.", e)
            progress.close()
            return 1
        progress.close()
        try:
            copy_of = self.checkpointer.output_at(self.global_step) if ended_with_checkpoint else None
            self._save_final(copy_of)
        except WriteFailed as e:
            if self.rank == 0:
                log.error("%s", e)
            return 1
        return 0

    def _local_grad_norm(self) -> float | None:
        """The gradient norm before clipping where DeepSpeed does not report one (ZeRO-0 in fp32).

        There the gradients are whole and already averaged across ranks after the boundary's backward.
        """
        if self.zero_stage != 0 or self.bf16:
            return None
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return 0.0
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    def _log_step(self, totals: torch.Tensor, lr: float, grad_norm: float | None, started: float, epoch: int,
                  progress) -> float:
        reduced = totals.to(self.device)  # a copy; NCCL reduces CUDA tensors only
        dist.all_reduce(reduced)
        now = time.perf_counter()
        seconds = max(now - started, 1e-9)
        memory, memory_kind = _peak_memory_mb(self.device)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        loss = reduced[0].item() / (self.cfg.gradient_accumulation_steps * self.world_size)
        record = {
            "step": self.global_step, "epoch": epoch, "loss": loss, "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": reduced[2].item() / seconds, "tokens_per_s": reduced[1].item() / seconds,
            "peak_mem_mb": memory, "peak_mem_kind": memory_kind, "skipped_records": int(reduced[3].item()),
        }
        if self.rank == 0:
            self.report.log(record)
            progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                                 mem_mb=f"{memory:.0f}", refresh=False)
            progress.update(1)
        return now

    # ----------------------------------------------------------------------------------- outputs
    def _gathered_tuned(self):
        # a whole model directory (full fine-tuning) needs the frozen parameters too
        params = [p for p in self.model.parameters() if p.requires_grad or self.cfg.method == "full"]
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def _write_output(self, path: Path, copy_of: Path | None = None) -> None:
        """What the method leaves (methods.OUTPUT_NAMES: the prompt file, a PEFT adapter or a model
        directory), written by rank 0 under a temporary name, then renamed (all ranks must call this).

        In bf16 it holds the optimizer's fp32 master values, not the module's bf16 copies of them.
        copy_of: the same output of the same state (the checkpoint just written) to copy instead: under
        ZeRO-3, DeepSpeed 0.17 gathers garbage into a parameter gathered twice in a row.
        """
        tmp = path.with_name(f".tmp-{path.name}")
        if copy_of is not None:
            if self.rank == 0:
                remove_path(tmp)
                (shutil.copytree if copy_of.is_dir() else shutil.copyfile)(copy_of, tmp)
                replace_path(tmp, path)
            return
        with self._gathered_tuned():
            values = {}
            if self.bf16:  # collective under ZeRO 1-3
                tuned = trainable_parameters(self.model)
                values = fp32_master_values(self.optimizer, tuned)
            if self.rank == 0:
                remove_path(tmp)
                save_output(self.model, tmp, values, tokenizer=self.tokenizer, processor_dir=self.cfg.processor_dir)
                replace_path(tmp, path)

    def _save_checkpoint(self, rng: dict) -> None:
        """Checkpoint step-<global_step>; rng: the RNG state to restore on resume (rng_state())."""
        step = self.global_step
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        client = {"step": step, "signature": self._run_signature(),  # the data position: where the next step reads
                  "epoch": epoch, "micro_batch_in_epoch": step_in_epoch * self.cfg.gradient_accumulation_steps,
                  "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}
        self.checkpointer.save(step, self.engine, client, rng, self._write_output)

    def _save_final(self, copy_of: Path | None = None) -> None:
        """The prompt file (a copy of `copy_of`, the final checkpoint's, where given); where it cannot be
        written (a full disk), it goes to the system's temporary directory instead, so that a run
        without checkpoints is not lost, and WriteFailed says where."""
        path = self.output_dir / OUTPUT_NAMES[self.cfg.method]
        try:
            self._write_output(path, copy_of)
        except WRITE_ERRORS as e:
            fallback = Path(tempfile.gettempdir()) / f"m2pt-prompts-{os.getpid()}.safetensors"
            try:
                self._write_output(fallback, copy_of)
            except WRITE_ERRORS as second:
                raise WriteFailed(self.checkpointer.failure("the prompt file", e)
                                  + f"; nor to {fallback}: {second}") from e
            raise WriteFailed(self.checkpointer.failure("the prompt file", e)
                              + f"; the trained prompts were written to {fallback} instead") from e
        if self.rank == 0:
            last = self.metrics_path.read_text().splitlines()[-1:]
            loss = json.loads(last[0])["loss"] if last else float("nan")
            log.info("done: %d steps, last loss %.4f; trained %s in %s", self.global_step, loss, self.cfg.method, path)

    def cleanup(self) -> None:
        if self.report is not None:
            self.report.close()
        # Without the barrier, 2-rank gloo runs sometimes abort at exit (docs/compatibility.md).
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output_dir {output_dir} cannot be written ({e.strerror or e}): "
                        "give a directory this user can write to") from e


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    lock = OutputDirLock(config.output_dir)
    try:  # refused before any weights are read
        load_ds_config(config.ds_config)
        check_installed(config.reporters)
        _check_writable(Path(config.output_dir))
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, taken by its first process
            note = lock.acquire()
            if note:
                print(f"train.py: {config.output_dir}: {note}", file=sys.stderr)
        watch_runner()  # a signal to the `deepspeed` command alone reaches no rank otherwise
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    recipe = M2PTRecipe(config)
    try:
        recipe.setup()
        return recipe.train()
    except UserError as e:  # a bad option, file or data set: the message says the fix; a bug keeps its traceback
        log.error("%s", e)
        return 2
    finally:
        recipe.cleanup()
        lock.release()
