"""The `edgediff` metadata record stored in an ONNX file's metadata_props (DESIGN.md)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

KEY = "edgediff"
FORMAT_VERSION = 1
REQUIRED = ("format_version", "prediction", "time_input", "schedule", "sample_shape", "data_range")


def make_metadata(*, name: str, description: str, prediction: str, time_input: str,
                  schedule: dict, sample_shape: list[int], data_range: tuple[float, float] = (-1.0, 1.0),
                  conditioning: dict | None = None, extra: dict | None = None,
                  sampling: dict | None = None) -> dict:
    """The `edgediff` record; `sampling` ({"sampler": NAME, "steps": K[, "spacing": NAME]})
    names the sampler, steps (and spacing) the runtime takes when a run names none (a
    distilled model's few steps)."""
    if prediction not in ("epsilon", "v", "sample", "score"):
        raise ValueError(f"prediction must be epsilon, v, sample or score, not {prediction!r}")
    if time_input not in ("index", "continuous", "sigma"):
        raise ValueError(f"time_input must be index, continuous or sigma, not {time_input!r}")
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "prediction": prediction,
        "time_input": time_input,
        "schedule": schedule,
        "sample_shape": list(sample_shape),
        "data_range": list(data_range),
        "conditioning": conditioning,
    }
    if sampling is not None:
        if not {"sampler", "steps"} <= set(sampling) <= {"sampler", "steps", "spacing"} \
                or not int(sampling["steps"]) >= 1:
            raise ValueError("sampling must be {'sampler': NAME, 'steps': K >= 1[, 'spacing': NAME]}, "
                             f"not {sampling!r}")
        meta["sampling"] = {"sampler": str(sampling["sampler"]), "steps": int(sampling["steps"]),
                            **({"spacing": str(sampling["spacing"])} if "spacing" in sampling else {})}
    if extra:
        meta["extra"] = extra
    return meta


def write_metadata(model: onnx.ModelProto, meta: dict) -> None:
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"edgediff metadata lacks {missing}")
    for prop in list(model.metadata_props):
        if prop.key == KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = KEY
    entry.value = json.dumps(meta, sort_keys=True)


def read_metadata(path: Path) -> dict | None:
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == KEY:
            return json.loads(prop.value)
    return None
