"""Expert parallelism on 8 fake CPU devices (a subprocess: the device count is fixed at start-up)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import numpy as np
import jax, jax.numpy as jnp
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flashit_jax import FlashitError, tree
from models import Model, mixtral
from models.mixtral import MixtralConfig

assert jax.device_count() == 8, jax.devices()
cfg = MixtralConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32, n_experts=8, top_k=2)
model = Model(cfg)
params = model.init_params(jax.random.key(0))
for lp in params["layers"].values():
    lp["moe"]["router"]["w"] = lp["moe"]["router"]["w"] * 50.0
ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
fwd = jax.jit(lambda p, ids: model.forward(p, ids)[0])
layer = jax.jit(lambda p, x: mixtral.moe_layer(p, x, cfg, dispatch=True)[0])
x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, 32)), jnp.float32)
ref_logits, ref_layer = fwd(params, ids), layer(params["layers"][0]["moe"], x)

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)

for shape, names in [((8,), ("expert",)), ((2, 4), ("data", "expert"))]:
    mesh = Mesh(np.array(jax.devices()).reshape(shape), names)
    ep = mesh.shape["expert"]
    place = lambda path, a: jax.device_put(a, NamedSharding(mesh, P("expert") if "/moe/experts/" in path else P()))
    sharded = tree.map_with_path(place, params)
    w = sharded["layers"][0]["moe"]["experts"]["gate"]["w"]
    assert {s.data.shape[0] for s in w.addressable_shards} == {8 // ep}, "experts not split over the expert axis"
    with jax.set_mesh(mesh):
        hlo = layer.lower(sharded["layers"][0]["moe"], x).compile().as_text()
        assert "all-reduce" in hlo, "expert-parallel path not taken"
        d_layer = rel(layer(sharded["layers"][0]["moe"], x), ref_layer)
        d_logits = rel(fwd(sharded, ids), ref_logits)
    print(names, "layer rel diff", d_layer, "logits rel diff", d_logits)
    assert d_layer <= 1e-6 and d_logits <= 1e-6, (d_layer, d_logits)

mesh = Mesh(np.array(jax.devices()[:6]).reshape(2, 3), ("data", "expert"))
try:
    with jax.set_mesh(mesh):
        layer(params["layers"][0]["moe"], x)
except FlashitError as e:
    assert "8 experts cannot be split evenly over the mesh's `expert` axis of size 3" in str(e), e
    print("error:", e)
else:
    raise AssertionError("an expert axis of 3 for 8 experts must be refused")
print("SHARDING OK")
'''


def test_expert_parallel_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "SHARDING OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]
