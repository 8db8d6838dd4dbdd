"""What the ``jaxcnn train`` flags given mean for the run: the :class:`~jaxcnn.train.Config` they make, after
inferring what they imply, refusing what makes no sense and dropping, with a warning, what has no effect.

Only flags actually given are judged: every field has a value (a default, or the one a resumed run saved), so
a value the run ignores is no mistake unless someone typed it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jaxcnn.train.config import DIRECTORY_DATASETS, FILE_DATASETS, Config, flag_of, ignored_fields


def resolve(
    given: Mapping[str, Any], saved: Config | None, say: Callable[[str], None], preset: str | None = None
) -> Config:
    """The run's config from the flags ``given`` (field -> value) over ``saved`` (a resumed run's) or the defaults.

    * ``preset`` (``--preset NAME``, see :mod:`jaxcnn.train.presets`) lays its values under the flags given, over
      the defaults; it is refused for a workdir that holds a run (``saved``), whose saved config a preset must
      not change. A preset whose learning rate scales with the batch size says so when ``--batch-size`` is
      given without ``--learning-rate``.
    * ``--data-path`` without ``--dataset`` implies ``--dataset npz`` (said through ``say``); with another
      data set given, or a resumed run of another data set, it is refused, and so is ``--data-dir`` with a data
      set that has no directory.
    * A flag the run would ignore (``--momentum`` with ``--optimizer adam``; ``--warmup-epochs``,
      ``--schedule-epochs`` or ``--decay-rate`` with a schedule that has none) is dropped with one warning
      through ``say``, so that config.json keeps describing the run.

    Raises:
        ValueError: a refused combination, naming the flags as typed; ConfigError: an invalid value (its
            :meth:`~jaxcnn.train.config.ConfigError.with_flags` names the flag).
    """
    given = dict(given)
    base = saved if saved is not None else Config()
    if "data_path" in given and "dataset" not in given and saved is None:
        given["dataset"] = FILE_DATASETS[0]
        say("jaxcnn train: note: --data-path implies --dataset npz")
    layer = _preset_layer(preset, given, saved, say)  # the preset's values ({} without one), under the flags
    dataset = given.get("dataset", layer.get("dataset", base.dataset))
    where = "" if "dataset" in given else f" (preset {preset})" if "dataset" in layer else " (the default)"
    where = " (the run in this workdir)" if saved is not None and "dataset" not in given else where
    for field, datasets in (("data_path", FILE_DATASETS), ("data_dir", DIRECTORY_DATASETS)):
        if field in given and dataset not in datasets:
            names = ", ".join(datasets[:-1]) + " or " + datasets[-1] if len(datasets) > 1 else datasets[0]
            raise ValueError(f"{flag_of(field)} is for --dataset {names}, not --dataset {dataset}{where}")
    config = base.replace(**{**layer, **given})
    ignored = ignored_fields(config)
    dropped = [field for field in given if field in ignored]  # typed flags only: a preset's values stay
    for field in dropped:
        cause = ignored[field]
        say(
            f"jaxcnn train: warning: {flag_of(field)} has no effect with {flag_of(cause)} {getattr(config, cause)} "
            "(ignored, not saved)"
        )
    if dropped:
        config = base.replace(**{**layer, **{field: value for field, value in given.items() if field not in dropped}})
    return config


def _preset_layer(
    name: str | None, given: Mapping[str, Any], saved: Config | None, say: Callable[[str], None]
) -> dict[str, Any]:
    """The fields the preset ``name`` sets, its learning rate scaled to the batch size ``given`` ({} for no
    preset); ValueError for an unknown name or a workdir that holds a run."""
    if name is None:
        return {}
    from jaxcnn.train import presets

    preset = presets.get(name)
    if saved is not None:
        raise ValueError(
            f"--preset {name} only starts runs, and this workdir holds one: resume it without --preset (it keeps "
            "its saved config), or give a new --workdir"
        )
    fields = preset.fields(given)
    if "dataset" not in given and fields.get("dataset") == "folder" and "data_dir" not in given:
        raise ValueError(f"--preset {name} trains on an image folder: give --data-dir ROOT (ROOT/train/<class>/*)")
    if preset.reference_batch is not None and "batch_size" in given and "learning_rate" not in given:
        base_rate, reference = preset.values["learning_rate"], preset.reference_batch
        say(
            f"jaxcnn train: note: --preset {name} scales the learning rate with the batch size: --learning-rate "
            f"{fields['learning_rate']:g} ({base_rate:g} x {given['batch_size']}/{reference})"
        )
    return {field: fields[field] if field == "learning_rate" else value for field, value in preset.values.items()}
