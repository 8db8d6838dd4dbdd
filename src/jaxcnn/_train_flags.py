"""What the ``jaxcnn train`` flags given mean for the run: the :class:`~jaxcnn.train.Config` they make, after
inferring what they imply, refusing what makes no sense and dropping, with a warning, what has no effect.

Only flags actually given are judged: every field has a value (a default, or the one a resumed run saved), so
a value the run ignores is no mistake unless someone typed it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jaxcnn.train.config import DIRECTORY_DATASETS, FILE_DATASETS, Config, flag_of, ignored_fields


def resolve(given: Mapping[str, Any], saved: Config | None, say: Callable[[str], None]) -> Config:
    """The run's config from the flags ``given`` (field -> value) over ``saved`` (a resumed run's) or the defaults.

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
    dataset = given.get("dataset", base.dataset)
    where = "" if "dataset" in given else " (the default)" if saved is None else " (the run in this workdir)"
    for field, datasets in (("data_path", FILE_DATASETS), ("data_dir", DIRECTORY_DATASETS)):
        if field in given and dataset not in datasets:
            names = ", ".join(datasets[:-1]) + " or " + datasets[-1] if len(datasets) > 1 else datasets[0]
            raise ValueError(f"{flag_of(field)} is for --dataset {names}, not --dataset {dataset}{where}")
    config = base.replace(**given)
    ignored = ignored_fields(config)
    dropped = [field for field in given if field in ignored]
    for field in dropped:
        cause = ignored[field]
        say(
            f"jaxcnn train: warning: {flag_of(field)} has no effect with {flag_of(cause)} {getattr(config, cause)} "
            "(ignored, not saved)"
        )
    if dropped:
        config = base.replace(**{field: value for field, value in given.items() if field not in dropped})
    return config
