"""Where a bundle comes from, typed: the manifest fields every target of a build shares (the data,
the calibration subset, the backbone and its weights, the training, the numerics, and the budget
search when one chose the configuration). `to_dict()` is what the manifest carries."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BackboneRecord:
    name: str
    weights_origin: str
    weights_sha256: str
    weights_file: str


@dataclass(frozen=True)
class TrainingRecord:
    strategy: str
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    device: str


@dataclass(frozen=True)
class DataRecord:
    n_train: int
    n_val: int
    n_test: int
    skipped: int
    presplit: bool
    warnings: list[str]


@dataclass(frozen=True)
class Provenance:
    edgetl_version: str
    seed: int
    data_sha256: str
    calibration_sha256: str
    calibration_size: int
    backbone: BackboneRecord
    training: TrainingRecord
    classes: list[str]
    numerics: dict
    data: DataRecord
    search: dict | None = None  # budget.SearchRecord.to_dict() when a budget search chose the configuration

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["search"] is None:
            del d["search"]
        return d


def of(p, trained, calib_items: list, device: str, search: dict | None = None) -> Provenance:
    """The provenance of a build: `p` a prepare.Prepared, `trained` its train.TrainResult."""
    from . import __version__, data, threads

    ds = p.dataset
    return Provenance(
        edgetl_version=__version__, seed=p.recipe.seed, data_sha256=ds.sha256,
        calibration_sha256=data.items_sha256(calib_items, ds.root), calibration_size=len(calib_items),
        backbone=BackboneRecord(p.spec.name, p.weights.origin, p.weights.sha256, p.weights.path.name),
        training=TrainingRecord(p.recipe.train.strategy, trained.best_epoch, trained.best_val_accuracy,
                                len(trained.history), device),
        classes=list(ds.classes), numerics=threads.record(),
        data=DataRecord(len(ds.split("train")), len(ds.split("val")), len(ds.split("test")), len(ds.skipped),
                        ds.presplit, list(p.data_warnings)),
        search=search)
