"""Stage 3: fit a classifier head (feature-extract) or the top of the backbone too (fine-tune).

Both strategies: AdamW, cosine schedule, label smoothing, early stopping on validation accuracy
with the best checkpoint kept, fully seeded. Evaluation preprocessing is the bundle's own
(runtime/preprocess.py); augmentation only adds a random crop/flip/colour jitter before it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .export import onnxruntime_twin
from .progress import NullProgress, Progress
from .recipe import TrainSection
from .runtime.preprocess import preprocess
from .views import TrainViews, augmenter

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: object  # torch nn.Sequential(trunk, head), eval mode
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    seconds_features: float = 0.0
    views: TrainViews | None = None  # the training views the head was fitted on (feature-extract)
    view_logits: np.ndarray | None = None  # the trained model's logits on those views


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def eval_arrays(images, contract: dict) -> np.ndarray:
    return np.stack([preprocess(img, contract) for img in images])


def forward_batches(module, arrays: np.ndarray, batch: int, progress: Progress, description: str):
    import torch

    out = []
    starts = range(0, len(arrays), batch)
    with torch.inference_mode():
        for s in progress.track(starts, total=len(starts), description=description):
            out.append(module(torch.from_numpy(arrays[s:s + batch])).float())
    return torch.cat(out)


def _twin_forward(session, batches, total: int, progress: Progress, description: str) -> np.ndarray:
    """Features of preprocessed batches, one batch at a time (memory stays flat)."""
    out = [session.run(None, {"input": x})[0]
           for x in progress.track(batches, total=total, description=description)]
    return np.concatenate(out)


def _fit(param_groups, *, n: int, batch_loss, train_mode, val_logits, y_val, snapshot, cfg: TrainSection,
         seed: int, progress: Progress):
    """Shared loop: AdamW + cosine per step, early stopping on val accuracy (then loss), best state kept.

    batch_loss(idx) -> loss for training rows idx; train_mode() puts the trainable parts in train mode;
    val_logits() -> validation logits in eval mode; snapshot() -> a copy of the state to keep.
    """
    import torch
    from torch.nn import functional as F

    gen = torch.Generator().manual_seed(seed)
    steps = max(1, (n + cfg.batch_size - 1) // cfg.batch_size)
    opt = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps))
    best = (-1.0, float("inf"))
    best_state, best_epoch, history, stale = None, 0, [], 0
    for epoch in progress.track(range(1, cfg.epochs + 1), total=cfg.epochs, description="train"):
        train_mode()
        total = 0.0
        batches = list(torch.randperm(n, generator=gen).split(cfg.batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on a batch of one
            batches[-2:] = [torch.cat(batches[-2:])]
        for idx in batches:
            loss = batch_loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            logits = val_logits()
        val_acc = float((logits.argmax(1) == y_val).float().mean())
        val_loss = float(F.cross_entropy(logits, y_val))
        history.append({"epoch": epoch, "train_loss": round(total / n, 5), "val_accuracy": round(val_acc, 5),
                        "val_loss": round(val_loss, 5)})
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_state, best_epoch, stale = (val_acc, val_loss), snapshot(), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    return best_state, best_epoch, best[0], history


def fit_feature_extract(trunk, num_classes: int, train_images, train_labels, val_images, val_labels,
                        contract: dict, cfg: TrainSection, seed: int, progress: Progress = NullProgress()):
    """Frozen trunk: compute features once (clean + augmented views), train the linear head on the cache."""
    import time

    import torch
    from torch import nn

    seed_everything(seed)
    trunk.eval().requires_grad_(False)
    t0 = time.perf_counter()
    views = TrainViews(list(train_images), np.asarray(train_labels), contract, cfg.augment_views, seed)
    y_train = torch.as_tensor(views.view_labels)
    batch = 8
    with tempfile.TemporaryDirectory(prefix="edgetl-twin-") as tmp:
        twin = onnxruntime_twin(trunk, contract["input_size"], Path(tmp),
                                check=eval_arrays(val_images[:4], contract))
        f_train = torch.from_numpy(_twin_forward(twin, views.batches(batch), -(-len(views) // batch), progress,
                                                 "features (train)"))
        val_batches = (eval_arrays(val_images[s:s + batch], contract) for s in range(0, len(val_images), batch))
        f_val = torch.from_numpy(_twin_forward(twin, val_batches, -(-len(val_images) // batch), progress,
                                               "features (val)"))
    y_val = torch.as_tensor(np.asarray(val_labels))
    seconds = time.perf_counter() - t0

    head = nn.Linear(f_train.shape[1], num_classes)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def val_logits():
        head.eval()
        return head(f_val)

    state, best_epoch, best_acc, history = _fit(
        [{"params": head.parameters(), "lr": cfg.lr}], n=len(f_train),
        batch_loss=lambda idx: loss_fn(head(f_train[idx]), y_train[idx]), train_mode=head.train,
        val_logits=val_logits, y_val=y_val, snapshot=lambda: copy.deepcopy(head.state_dict()), cfg=cfg,
        seed=seed, progress=progress)
    head.load_state_dict(state)
    model = nn.Sequential(trunk, head).eval()
    with torch.no_grad():
        view_logits = head(f_train).numpy()
    return TrainResult(model, history, best_epoch, best_acc, seconds, views, view_logits)


def _unfreeze_top(trunk, n_blocks: int) -> list:
    """Trainable: the top n blocks of trunk.features (all when -1) and any pre-logit classifier layers."""
    trunk.requires_grad_(n_blocks == -1)
    blocks = list(trunk.features.children())
    chosen = blocks if n_blocks == -1 else blocks[max(0, len(blocks) - n_blocks):] if n_blocks else []
    for b in chosen:
        b.requires_grad_(True)
    trunk.classifier.requires_grad_(True)
    return [p for p in trunk.parameters() if p.requires_grad]


def fit_fine_tune(trunk, num_classes: int, train_images, train_labels, val_images, val_labels,
                  contract: dict, cfg: TrainSection, seed: int, progress: Progress = NullProgress()):
    """Unfreeze the top `cfg.unfreeze_blocks` blocks; backbone LR = lr * backbone_lr_scale."""
    import torch
    from torch import nn

    seed_everything(seed)
    head = nn.Linear(_feature_dim(trunk, contract), num_classes)
    model = nn.Sequential(trunk, head)
    backbone_params = _unfreeze_top(trunk, cfg.unfreeze_blocks)
    aug = augmenter(contract)
    x_val = eval_arrays(val_images, contract)
    y_val = torch.as_tensor(np.asarray(val_labels))
    y_train = torch.as_tensor(np.asarray(train_labels))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def set_train_mode():
        model.eval()  # frozen BatchNorm layers keep their ImageNet statistics
        for m in model.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                m.train()

    def batch_loss(idx):
        x = torch.from_numpy(np.stack([aug(train_images[i]) for i in idx.tolist()]))
        return loss_fn(model(x), y_train[idx])

    def val_logits():
        model.eval()
        return forward_batches(model, x_val, 64, NullProgress(), "")

    groups = [{"params": head.parameters(), "lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_scale})
    state, best_epoch, best_acc, history = _fit(
        groups, n=len(train_images), batch_loss=batch_loss, train_mode=set_train_mode, val_logits=val_logits,
        y_val=y_val, snapshot=lambda: copy.deepcopy(model.state_dict()), cfg=cfg, seed=seed, progress=progress)
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return TrainResult(model, history, best_epoch, best_acc)


def _feature_dim(trunk, contract: dict) -> int:
    import torch

    with torch.inference_mode():
        return int(trunk.eval()(torch.zeros(1, 3, *contract["input_size"])).shape[1])


STRATEGIES = {"feature-extract": fit_feature_extract, "fine-tune": fit_fine_tune}
