"""The edit-data pipeline: find samples, plan their size, decode them, check a dataset.

- ``records``: ``SampleRecord`` (one example before decoding, ``fingerprint()``), image references,
  ``DataProblem``
- ``sources``: ``open_records(data, base_dir)`` dispatching on ``data.path`` to ``folder``, ``manifest``,
  ``hf`` and ``shapes`` (``builtin:shapes``); ``split_holdout``
- ``resize``: ``plan_size`` / ``plan_control_size`` (fixed, pixel budget, aspect buckets; sides multiple of 16);
  one crop box per sample (``plan_target`` / ``plan_control``, ``shares_target_geometry``) and the pipelines'
  condition sizes (``condition_size``)
- ``images``: decoding and normalisation (EXIF, alpha, palette, 16-bit, CMYK) and ``fit``
- ``load``: ``load_sample(record, data, sizing) -> EditSample``
- ``check``: ``check_dataset(data, base_dir) -> list[DataProblem]`` (``qflux data check``) and
  ``validate_dataset`` (the same check, fatal: run before ``qflux train`` / ``qflux cache`` write anything)

Caption dropout is the trainer's job, not this package's.
"""

from qflux.data.check import DataReport, check_dataset, inspect_dataset, validate_dataset
from qflux.data.images import fit, open_mask, open_rgb
from qflux.data.load import load_sample
from qflux.data.records import (
    BytesImage,
    DataProblem,
    DatasetCell,
    FileImage,
    ImageRef,
    MemoryImage,
    SampleRecord,
)
from qflux.data.resize import (
    condition_size,
    plan_control,
    plan_control_size,
    plan_size,
    plan_target,
    resize_mode,
    shares_target_geometry,
)
from qflux.data.sources import open_records, scan_dataset, split_holdout

__all__ = [
    "BytesImage",
    "DataProblem",
    "DataReport",
    "DatasetCell",
    "FileImage",
    "ImageRef",
    "MemoryImage",
    "SampleRecord",
    "check_dataset",
    "condition_size",
    "fit",
    "inspect_dataset",
    "load_sample",
    "open_mask",
    "open_records",
    "open_rgb",
    "plan_control",
    "plan_control_size",
    "plan_size",
    "plan_target",
    "resize_mode",
    "scan_dataset",
    "shares_target_geometry",
    "split_holdout",
    "validate_dataset",
]
