"""Stage 3: fit a classifier head (feature-extract) or the top of the backbone too (fine-tune).

Both strategies: AdamW, cosine schedule, label smoothing, early stopping on validation accuracy
with the best checkpoint kept, fully seeded. Evaluation preprocessing is the bundle's own
(runtime/preprocess.py); augmentation only adds a random crop/flip/colour jitter before it.

Data is streamed (edgetl/loader.py): training images are decoded and augmented by DataLoader
workers, each sample seeded by (seed, view or epoch, image content) — results do not depend on the
worker count. Feature-extract reads the frozen trunk's rows from the feature cache
(edgetl/features.py) and computes only the missing ones, split across ranks. Fine-tune trains on
`Fit.device` (AMP and channels-last on CUDA) and, with several ranks, with DistributedDataParallel
over a DistributedSampler: the global batch is `batch_size`, each rank takes its slice, BatchNorm
statistics stay frozen (their affine weights train), so N processes follow one process's steps.

Past 400 lines on purpose: the two strategies share one fitting loop (`_fit`: schedule, early
stopping, best checkpoint), its seeding and its device handling; split apart, the shared loop would
sit in a room of its own that only this one imports.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import features, interrupt
from .launch import SINGLE, Ranks
from .loader import stream
from .progress import NullProgress, Progress
from .recipe import TrainSection
from .views import AUGMENT_VERSION, EpochSamples, TrainViews

log = logging.getLogger(__name__)
FEATURE_BATCH = 16


@dataclass
class Fit:
    """How training runs (none of it changes the result, except the device's arithmetic)."""

    device: str = "cpu"
    workers: int = 0
    ranks: Ranks = SINGLE
    cache_dir: Path | None = None  # feature-extract rows cached here; None = always compute
    progress: Progress = field(default_factory=NullProgress)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class Job:
    """What one training run fits: the trunk, the splits, the input contract, the recipe's [train], the seed."""

    trunk: object  # torch module: the pretrained backbone with its classifier replaced by the new head
    num_classes: int
    train_items: list
    val_items: list
    contract: dict
    cfg: TrainSection
    seed: int
    val_x: object = None  # the val split preprocessed (loader.Split): fine-tune's early stopping, on rank 0
    cache_namespace: dict | None = None  # feature-extract: what the cached feature rows depend on


@dataclass
class TrainResult:
    model: object  # torch nn.Sequential(trunk, head), eval mode, on the CPU; None on ranks other than 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    seconds_features: float = 0.0
    views: TrainViews | None = None  # the training views the head was fitted on (feature-extract)
    view_logits: np.ndarray | None = None  # the trained model's logits on those views
    cache: dict | None = None  # feature cache statistics (feature-extract)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and fix torch's thread count (threads.py: its sums depend on
    it), for a reproducible fit."""
    import random

    import torch

    from .threads import fix_numerics

    fix_numerics()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def forward_batches(module, arrays, batch: int, progress: Progress, description: str, device: str = "cpu"):
    """module(arrays) in batches (arrays: ndarray or loader.Split), float32 logits on the CPU. On CUDA
    in full float32 (no TF32): this is the float reference the gate compares against."""
    import torch

    out = []
    starts = range(0, len(arrays), batch)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        module = module.to(device)
    with torch.inference_mode():
        for s in progress.track(starts, total=len(starts), description=description):
            x = torch.from_numpy(np.ascontiguousarray(arrays[s:s + batch]))
            out.append(module(x.to(device) if cuda else x).float().cpu())
    if cuda:
        module.cpu()
    return torch.cat(out)


def trunk_runtime(fit: Fit) -> str:
    """What computes the feature rows (part of the cache namespace)."""
    import torch

    if fit.cuda:
        gpu = torch.cuda.get_device_name(torch.device(fit.device))
        return f"torch-{torch.__version__}-cuda-{torch.version.cuda}-cudnn-{torch.backends.cudnn.version()}-{gpu}-fp32"
    import onnxruntime as ort

    return f"onnxruntime-{ort.__version__}-cpu-fp32"


def trunk_rows(trunk, contract: dict, fit: Fit, tmp: Path, check: np.ndarray):
    """batch -> float32 rows: onnxruntime on the CPU (several times faster than eager torch there),
    torch float32 on CUDA (channels-last)."""
    import torch

    if fit.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        net = trunk.to(fit.device).to(memory_format=torch.channels_last)

        def run(x):
            with torch.inference_mode():
                t = torch.from_numpy(x).to(fit.device).contiguous(memory_format=torch.channels_last)
                return net(t).float().cpu().numpy()

        return run
    from .export import onnxruntime_twin

    twin = onnxruntime_twin(trunk, contract["input_size"], tmp, check=check)  # threads: threads.engine()
    return lambda x: twin.run(None, {"input": x})[0]


def feature_namespace(spec_name: str, weights_sha256: str, contract: dict) -> dict:
    """What a cached row depends on besides the image, its view and the runtime (see features.py)."""
    import PIL
    import torchvision

    from . import __version__

    # The rows are pixels through the trunk: what decodes and resizes them (Pillow), what augments
    # them (edgetl's augmentation, drawn by torchvision's functional ops) changes them too.
    return {"format": features.FORMAT, "edgetl": __version__, "backbone": spec_name,
            "weights_sha256": weights_sha256, "contract": contract, "pillow": PIL.__version__,
            "torchvision": torchvision.__version__, "augment": AUGMENT_VERSION}


def _view_rows(views: TrainViews, run, fit: Fit, cache, stats, description: str):
    def compute(order):
        chunks = [order[s:s + FEATURE_BATCH] for s in range(0, len(order), FEATURE_BATCH)]
        batches = views.batches(FEATURE_BATCH, order=order)
        for idx, x in fit.progress.track(zip(chunks, batches, strict=True), total=len(chunks),
                                         description=description):
            yield idx, run(x)

    return features.rows(views.view_keys(), compute, cache, fit.ranks, stats)


def fit_feature_extract(job: Job, fit: Fit | None = None) -> TrainResult:
    """Frozen trunk: feature rows of the clean + augmented training views and of the val split (cached
    on disk, float16), then the linear head trained on them."""
    trunk, num_classes, train_items, val_items = job.trunk, job.num_classes, job.train_items, job.val_items
    contract, cfg, seed, cache_namespace = job.contract, job.cfg, job.seed, job.cache_namespace
    import torch
    from torch import nn

    fit = fit or Fit()
    seed_everything(seed)
    trunk.eval().requires_grad_(False)
    t0 = time.perf_counter()
    views = TrainViews(list(train_items), contract, cfg.augment_views, seed, fit.workers)
    val_views = TrainViews(list(val_items), contract, 0, seed, fit.workers)
    with interrupt.temporary_folder("edgetl-twin-") as tmp:
        runner: list = []

        def run(x):  # the trunk is set up only when a row must be computed (a warm cache never needs it)
            if not runner:
                runner.append(trunk_rows(trunk, contract, fit, Path(tmp), check=x[:4]))
            return runner[0](x)

        cache = None if fit.cache_dir is None else \
            features.FeatureCache(fit.cache_dir, {**(cache_namespace or {}), "runtime": trunk_runtime(fit)})
        stats = [features.CacheStats(enabled=cache is not None, dir=str(cache.dir) if cache else None)
                 for _ in range(2)]
        f_train = _view_rows(views, run, fit, cache, stats[0], "features (train)")
        f_val = _view_rows(val_views, run, fit, cache, stats[1], "features (val)")
    trunk.cpu().to(memory_format=torch.contiguous_format)  # back from CUDA, as export expects it
    seconds = time.perf_counter() - t0
    if not fit.ranks.main:
        return TrainResult(None, seconds_features=seconds)
    cache_info = _merge_stats(stats)
    f_train, f_val = torch.from_numpy(f_train), torch.from_numpy(f_val)
    y_train = torch.as_tensor(views.view_labels)
    y_val = torch.as_tensor(val_views.view_labels)

    seed_everything(seed)  # the head starts the same whether the rows came from the cache or the trunk
    head = nn.Linear(f_train.shape[1], num_classes)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(seed)

    def train_epoch(_epoch, step):
        head.train()
        total = 0.0
        batches = list(torch.randperm(len(f_train), generator=gen).split(cfg.batch_size))
        for idx in batches:
            loss = loss_fn(head(f_train[idx].float()), y_train[idx])
            step(loss)
            total += float(loss.detach()) * len(idx)
        return total / len(f_train)

    def val_logits():
        head.eval()
        return head(f_val.float())

    state, best_epoch, best_acc, history = _fit(
        [{"params": head.parameters(), "lr": cfg.lr}], steps=-(-len(f_train) // cfg.batch_size),
        train_epoch=train_epoch, val_logits=val_logits, y_val=y_val,
        snapshot=lambda: copy.deepcopy(head.state_dict()), cfg=cfg, fit=Fit(progress=fit.progress))
    head.load_state_dict(state)
    model = nn.Sequential(trunk, head).eval()
    with torch.no_grad():
        view_logits = np.concatenate([head(f_train[s:s + 4096].float()).numpy()
                                      for s in range(0, len(f_train), 4096)])
    return TrainResult(model, history, best_epoch, best_acc, seconds, views, view_logits, cache_info)


def _merge_stats(stats: list) -> dict:
    a, b = (s.to_dict() for s in stats)
    out = {**a, "rows": a["rows"] + b["rows"], "hits": a["hits"] + b["hits"],
           "computed": a["computed"] + b["computed"], "written": [w for w in (a["written"], b["written"]) if w],
           "seconds_read": round(a["seconds_read"] + b["seconds_read"], 3),
           "seconds_computed": round(a["seconds_computed"] + b["seconds_computed"], 3),
           "notes": a["notes"] + b["notes"]}
    return out


def _fit(param_groups, *, steps: int, train_epoch, val_logits, y_val, snapshot, cfg: TrainSection, fit: Fit,
         scaler=None):
    """Shared loop: AdamW + cosine per step, early stopping on val accuracy (then loss), best state kept.

    train_epoch(epoch, step) runs one epoch, calling step(loss) per batch, and returns the mean
    training loss; val_logits() -> validation logits in eval mode (rank 0; its verdict is shared so
    every rank runs the same epochs); snapshot() -> a copy of the state to keep.
    """
    import torch
    from torch.nn import functional as F

    opt = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps))

    def step(loss):
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale:
                return  # inf/NaN gradients: the scaler skipped this step, so the schedule does not move
        sched.step()

    best = (-1.0, float("inf"))
    best_state, best_epoch, history, stale = None, 0, [], 0
    for epoch in fit.progress.track(range(1, cfg.epochs + 1), total=cfg.epochs, description="train"):
        train_loss = train_epoch(epoch, step)
        verdict = None
        if fit.ranks.main:
            with torch.no_grad():
                logits = val_logits().float().cpu()
            verdict = (float((logits.argmax(1) == y_val).float().mean()), float(F.cross_entropy(logits, y_val)))
        val_acc, val_loss = fit.ranks.broadcast(verdict)
        history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "val_accuracy": round(val_acc, 5),
                        "val_loss": round(val_loss, 5)})
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_epoch, stale = (val_acc, val_loss), epoch, 0
            best_state = snapshot() if fit.ranks.main else None
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    return best_state, best_epoch, best[0], history


def _unfreeze_top(trunk, n_blocks: int) -> list:
    """Trainable: the top n blocks of trunk.features (all when -1) and any pre-logit classifier layers."""
    trunk.requires_grad_(n_blocks == -1)
    blocks = list(trunk.features.children())
    chosen = blocks if n_blocks == -1 else blocks[max(0, len(blocks) - n_blocks):] if n_blocks else []
    for b in chosen:
        b.requires_grad_(True)
    trunk.classifier.requires_grad_(True)
    return [p for p in trunk.parameters() if p.requires_grad]


def fit_fine_tune(job: Job, fit: Fit | None = None) -> TrainResult:
    """Unfreeze the top `cfg.unfreeze_blocks` blocks; backbone LR = lr * backbone_lr_scale; rank 0 stops
    early on the val split (`job.val_x`)."""
    trunk, num_classes, train_items, val_items = job.trunk, job.num_classes, job.train_items, job.val_items
    contract, cfg, seed, val_x = job.contract, job.cfg, job.seed, job.val_x
    import torch
    from torch import nn
    from torch.utils.data import DistributedSampler

    fit = fit or Fit()
    ranks = fit.ranks
    if cfg.batch_size % ranks.world:
        from .errors import UsageError

        raise UsageError(f"train.batch_size {cfg.batch_size} is the global batch and must divide among "
                         f"{ranks.world} processes; fix: a multiple of --nproc")
    seed_everything(seed)
    head = nn.Linear(_feature_dim(trunk, contract), num_classes)
    model = nn.Sequential(trunk, head)
    backbone_params = _unfreeze_top(trunk, cfg.unfreeze_blocks)
    y_val = torch.as_tensor(np.asarray([it.label for it in val_items], dtype=np.int64))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")
    dev = torch.device(fit.device)
    memory = torch.channels_last if fit.cuda else torch.contiguous_format
    model.to(dev).to(memory_format=memory)
    trained = model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[dev.index] if fit.cuda else None)
    samples = EpochSamples(list(train_items), contract, seed)
    sampler = DistributedSampler(range(len(samples)), num_replicas=ranks.world, rank=ranks.rank, shuffle=True,
                                 seed=seed)
    per_rank = cfg.batch_size // ranks.world
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=fit.cuda)
    scaler = torch.amp.GradScaler("cuda") if fit.cuda else None

    def set_train_mode():
        model.eval()  # BatchNorm statistics stay frozen (same steps on any number of ranks)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                m.train()

    n_train = len(samples)

    def train_epoch(epoch, step):
        set_train_mode()
        sampler.set_epoch(epoch)
        keys = [(epoch, i) for i in sampler]
        total = 0.0
        for j, (x, y) in enumerate(stream(samples, keys, per_rank, fit.workers)):
            # The sampler pads the epoch to a multiple of the ranks: rank r's k-th sample is position
            # r + k * world of the epoch; positions past the data are padding and weigh nothing. Each
            # rank's loss is its share of the global batch's mean, so the averaged gradient is the
            # one a single process computes on the same global batch.
            k = torch.arange(j * per_rank, j * per_rank + len(y))
            real = (ranks.rank + k * ranks.world < n_train).to(dev)
            n_global = min(n_train, (j + 1) * cfg.batch_size) - j * cfg.batch_size
            x = torch.from_numpy(x).to(dev, non_blocking=True).contiguous(memory_format=memory)
            y = torch.from_numpy(y).to(dev)
            with autocast:
                per_sample = loss_fn(trained(x), y)
            loss = (per_sample * real).sum() * (ranks.world / n_global)
            step(loss)
            total += float((per_sample.detach() * real).sum())
        return ranks.total(total) / n_train

    def val_logits():
        model.eval()
        out = []
        with torch.inference_mode(), autocast:
            for s in range(0, len(val_x), 64):
                x = torch.from_numpy(val_x[s:s + 64]).to(dev).contiguous(memory_format=memory)
                out.append(model(x).float().cpu())
        return torch.cat(out)

    groups = [{"params": head.parameters(), "lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_scale})
    state, best_epoch, best_acc, history = _fit(
        groups, steps=-(-len(sampler) // per_rank), train_epoch=train_epoch, val_logits=val_logits, y_val=y_val,
        snapshot=lambda: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, cfg=cfg, fit=fit,
        scaler=scaler)
    model.cpu().to(memory_format=torch.contiguous_format)
    if not ranks.main:
        return TrainResult(None, history, best_epoch, best_acc)
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return TrainResult(model, history, best_epoch, best_acc)


def _feature_dim(trunk, contract: dict) -> int:
    import torch

    with torch.inference_mode():
        return int(trunk.eval()(torch.zeros(1, 3, *contract["input_size"])).shape[1])


STRATEGIES = {"feature-extract": fit_feature_extract, "fine-tune": fit_fine_tune}


def run(job: Job, fit: Fit | None = None) -> TrainResult:
    """Train with the strategy the recipe's [train] names."""
    return STRATEGIES[job.cfg.strategy](job, fit)
