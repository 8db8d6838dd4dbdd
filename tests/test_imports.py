"""What the package loads: the layers that know only JAX (``jaxcnn.functional``, ``jaxcnn.nn``,
``jaxcnn.backprop``) load no flax, optax or orbax, and neither does ``import jaxcnn`` (its parts load on first use);
the CLI and ``jaxcnn.train`` load no dp_accounting until a privacy budget is computed.
"""

import json
import subprocess
import sys

JAX_ONLY = ("jaxcnn", "jaxcnn.functional", "jaxcnn.nn", "jaxcnn.backprop", "jaxcnn.models", "jaxcnn.distributed")

# one fresh process: each module in turn, then jaxcnn.train (which does load optax: the check can fail)
SCRIPT = """
import importlib, json, sys
loaded = {}
for module in MODULES + ["jaxcnn.train", "jaxcnn.cli"]:
    importlib.import_module(module)
    loaded[module] = sorted({name.split(".")[0] for name in sys.modules} & {"flax", "optax", "orbax", "dp_accounting"})
print(json.dumps(loaded))
"""


def test_the_jax_only_layers_load_no_flax_optax_or_orbax():
    code = SCRIPT.replace("MODULES", repr(list(JAX_ONLY)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for module in JAX_ONLY:
        assert loaded[module] == [], f"import {module} loads {loaded[module]}"
    assert "optax" in loaded["jaxcnn.train"]
    # dp_accounting (1.1 s of scipy) loads only when a privacy figure is computed, not with every `jaxcnn train`
    assert "dp_accounting" not in loaded["jaxcnn.cli"]
