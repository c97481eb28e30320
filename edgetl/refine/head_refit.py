"""Quantization-aware head refit: the last-layer form of AdaRound/AdaQuant-style reconstruction.

The quantized trunk runs over the training views (clean + augmented, exactly those training
used); the head is refitted so that INT8 trunk -> head reproduces the *float model's* logits:
ridge regression towards the float head,

    min_W,b  sum_i || W f_i + b - z_i ||^2  +  lam * || W - W_float ||^2

with f_i the features the quantized model's head receives and z_i the float logits. Closed form,
seconds on a CPU. lam is chosen by the logit error (MSE to the float logits) on the val *views*
(the seeded augmented views the search's evidence holds, at most SELECT_ROWS of them, every val
image alike), not by clean-val agreement: ten choices judged by top-1 on ~100 images would pick the
luckiest one and make the same images' evidence optimistic; a continuous error over hundreds of rows
does not. Without views, the clean val images' logit error decides. "Keep the head as quantized" is
one of the choices. The backend writes the new head into its own model format, quantized the way
the head was.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from . import RefineInputs

log = logging.getLogger(__name__)
# Ridge strengths, relative to the mean feature energy (trace(F'F) / D).
ALPHAS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
BATCH = 16


def _run(features_fn, batches) -> tuple[np.ndarray, np.ndarray]:
    feats, logits = zip(*(features_fn(x) for x in batches), strict=True)
    return np.concatenate(feats).astype(np.float64), np.concatenate(logits)


def normal_equations(pairs, theta0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum over batches of (f, z) of X'X and X'(z - X theta0), X = [f, 1]: the ridge's sufficient
    statistics, accumulated batch by batch (memory does not grow with the number of views)."""
    gram = rhs = None
    for f, z in pairs:
        x = np.hstack([np.asarray(f, dtype=np.float64), np.ones((len(f), 1))])
        g, r = x.T @ x, x.T @ (np.asarray(z, dtype=np.float64) - x @ theta0)
        gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
    return gram, rhs


def ridge_path(f: np.ndarray, z: np.ndarray, w0: np.ndarray, b0: np.ndarray, alphas=ALPHAS):
    """(alpha, W, b) for every alpha: the ridge solution shrunk towards (w0, b0); the bias is free."""
    theta0 = _theta(w0, b0)
    return ridge_solve(*normal_equations([(f, z)], theta0), theta0, alphas)


def _theta(w0: np.ndarray, b0: np.ndarray) -> np.ndarray:
    return np.vstack([w0.T, b0[None, :]]).astype(np.float64)  # (d+1, classes)


def ridge_solve(gram: np.ndarray, rhs: np.ndarray, theta0: np.ndarray, alphas=ALPHAS):
    """(alpha, W, b) for every alpha from the normal equations, shrunk towards theta0."""
    d = gram.shape[0] - 1
    scale = float(np.trace(gram[:d, :d])) / d or 1.0
    reg = np.eye(d + 1)
    reg[d, d] = 0.0
    out = []
    for a in alphas:
        theta = theta0 + np.linalg.solve(gram + a * scale * reg, rhs)
        out.append((a, theta[:d].T.copy(), theta[d].copy()))
    return out


def choose(candidates, f_sel: np.ndarray, current_logits: np.ndarray, ref: np.ndarray):
    """The lowest logit error (MSE to the float logits `ref`) of "keep" (`current_logits`) and every
    ridge fit on the selection rows' features `f_sel`; the earlier on a tie ("keep" first).
    Returns (alpha or None for keep, W, b, agreement, mse) and every choice's scores."""
    ref_top = ref.argmax(1)

    def score(logits):
        return float((logits.argmax(1) == ref_top).mean()), float(((logits - ref) ** 2).mean())

    agree, mse = score(current_logits)
    best = (None, None, None, agree, mse)
    table = [{"alpha": None, "agreement": agree, "mse": mse}]
    for a, w, b in candidates:
        agree, mse = score(f_sel @ w.T + b)
        table.append({"alpha": a, "agreement": agree, "mse": mse})
        if mse < best[4]:
            best = (a, w, b, agree, mse)
    return best, table


SELECT_ROWS = 512  # val view rows the ridge strength is chosen on (the first views of every val image)


def selection_rows(data) -> tuple[object, list[int] | None, np.ndarray]:
    """(images, row indices or None for all, the float logits on them): the val views the ridge strength
    is chosen on — the first k views of every val image, k*images <= SELECT_ROWS — or, without
    views, the clean val images."""
    k, n = data.evidence_views, len(data.val_y)
    if not k:
        return data.val_x, None, np.asarray(data.val_reference_logits)
    per = max(1, min(k, SELECT_ROWS // max(1, n)))
    rows = [i * k + j for i in range(n) for j in range(per)]
    return data.evidence_x, rows, np.asarray(data.evidence_reference_logits)[rows]


def head_refit(art: Artifact, inp: RefineInputs, backend, profile, workdir: Path) -> Artifact:
    """The model with its head refitted on its own INT8 trunk (see the module docstring)."""
    features_fn = backend.head_features(art, profile)
    z = inp.teacher_logits()
    theta0 = _theta(*(np.asarray(a, dtype=np.float64) for a in inp.head))
    train_pairs = ((features_fn(x)[0], z[s:s + len(x)])
                   for s, x in zip(range(0, len(inp.views), BATCH), inp.views.batches(BATCH), strict=True))
    gram, rhs = normal_equations(train_pairs, theta0)
    x, rows, ref = selection_rows(inp.data)
    picks = (x[s:s + BATCH] for s in range(0, len(x), BATCH)) if rows is None else \
        (x[rows[s:s + BATCH]] for s in range(0, len(rows), BATCH))
    f_sel, l_sel = _run(features_fn, picks)
    (alpha, w, b, agree, mse), table = choose(ridge_solve(gram, rhs, theta0), f_sel, l_sel, ref)
    info = {"refiner": "head_refit", "alpha": alpha, "chosen_on": "val views" if rows is not None else "val",
            "rows": len(ref), "mse": round(mse, 6), "agreement": agree, "n_views": len(inp.views), "path": table}
    log.info("head refit: alpha %s, logit MSE %.5f on %d %s rows (kept head: %.5f)", alpha, mse, len(ref),
             info["chosen_on"], table[0]["mse"])
    if alpha is None:  # the quantized head is already the best on val
        return Artifact(art.path, art.kind, art.sha256, {**art.meta, "refit": info})
    new = backend.with_head(art, w.astype(np.float32), b.astype(np.float32), workdir,
                            f"{art.path.stem.split('.')[0]}+head_refit")
    return Artifact(new.path, new.kind, new.sha256, {**art.meta, **new.meta, "refit": info})


head_refit.record_key = "refit"
