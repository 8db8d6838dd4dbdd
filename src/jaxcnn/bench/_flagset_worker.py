"""The worker process of an XLA flag set (``python -m jaxcnn.bench._flagset_worker``; see
:mod:`jaxcnn.bench.flagsets`). Kept out of the ``jaxcnn.bench`` package's imports so that ``-m`` runs it fresh."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def main() -> int:
    """The worker: answer requests from the parent, one JSON line each, until ``quit`` or end of input.

    Requests: ``{"hello": true}`` starts the backend (``{"backend", "xla_flags"}``); ``{"build": {...}}`` builds
    and warms up the contenders of one model (keys: ``model``, ``batch_size``, ``contenders``, ``dtype``,
    ``steps_per_call``, ``remat``, ``warmup``); ``{"run": contender, "steps": n}`` times ``n`` steps and returns
    ``{"seconds"}``; ``{"quit": true}`` ends it. A ValueError while building is returned as ``{"error"}``.
    """
    import jax

    runners: dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if "quit" in request:
            break
        try:
            if "hello" in request:
                reply = {"backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
            elif "build" in request:
                runners, reply = _build(request["build"])
            else:
                runner = runners[request["run"]]
                started = time.perf_counter()
                runner(int(request["steps"]))
                reply = {"seconds": time.perf_counter() - started}
        except ValueError as error:
            reply = {"error": str(error).splitlines()[0]}
        print(json.dumps(reply), flush=True)
    return 0


def _build(request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """This worker's runners for one model and the reply: ``{"ready": {contender: {"seconds", "memory"}},
    "skipped": {contender: reason}}``."""
    from jaxcnn import models
    from jaxcnn.bench import flagsets
    from jaxcnn.bench.contenders import Options, builders
    from jaxcnn.bench.harness import _batch, _ready

    name = request["model"]
    if name not in models.names():  # registered in the parent only: register its builder here too
        models.register(name, flagsets.import_builder(request["builder"], name), input_shape=request["input_shape"])
    model, input_shape = models.get(name), models.input_shape(name)
    x, y = _batch(input_shape, request["batch_size"], model.output_shape(input_shape)[-1])
    options = Options(request["dtype"], request["steps_per_call"], request["remat"])
    build = builders(model, input_shape, x, y, options)
    skipped: dict[str, str] = {}
    wanted = {contender: build[contender] for contender in request["contenders"]}
    ready = _ready(name, wanted, options.steps_per_call, request["warmup"], lambda line: None, skipped)
    runners = {contender: runner for contender, (runner, _, _) in ready.items()}
    info = {contender: {"seconds": seconds, "memory": memory} for contender, (_, seconds, memory) in ready.items()}
    return runners, {"ready": info, "skipped": skipped}


if __name__ == "__main__":
    sys.exit(main())
