"""`accelerate launch` with the shipped configs: FSDP2 trains the same model as DDP; the multi-node configs parse."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from test_train import train_args

from modeling_eomt import EomtForUniversalSegmentation

LAUNCH = Path(__file__).parents[1] / "modeling_eomt" / "training" / "launch"
# The README's FSDP flags for torchrun: `--fsdp --fsdp_config '{...}'`.
TORCHRUN_FSDP_CONFIG = '{"transformer_layer_cls_to_wrap": "EomtLayer"}'
# What a 2-node config may change in its 1-node twin: where the processes run, not how they train.
MACHINE_FIELDS = {"num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"}

# accelerate (1.16) turns FSDP on only for accelerator process groups (MULTI_GPU/NPU/XPU...): a CPU run is MULTI_CPU
# and silently ignores the FSDP plugin, i.e. trains with DDP. torch itself runs FSDP2 (`fully_shard`) on CPU with
# gloo, so this launcher restores the FSDP state accelerate would set on GPUs, then runs `eomt-train` unchanged. It
# also records which modules `fully_shard` wraps, so the test sees that sharding happened and followed the config.
CPU_FSDP_LAUNCHER = """
import os, runpy, sys
import torch.distributed.fsdp as fsdp
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

accelerator_state_init, fully_shard = AcceleratorState.__init__, fsdp.fully_shard

def init(self, *args, fsdp_plugin=None, **kwargs):
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin

def recorded_fully_shard(module, *args, **kwargs):
    with open(os.environ["SHARDED_LOG"] + os.environ["RANK"], "a") as log:
        log.write(type(module).__name__ + "\\n")
    return fully_shard(module, *args, **kwargs)

AcceleratorState.__init__, fsdp.fully_shard = init, recorded_fully_shard
sys.argv[0] = "eomt-train"
runpy.run_module("modeling_eomt.train", run_name="__main__")
"""


def launch(config: str, port: int, script: list[str], env: dict, log_dir: Path, machines: int = 1) -> None:
    """2 processes in all, spread over `machines` launchers on this host (as the nodes of a multi-node run)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / config),
               "--num_processes", "2", "--main_process_port", str(port)]  # fmt: skip
    if machines > 1:
        command += ["--num_machines", str(machines), "--main_process_ip", "127.0.0.1"]
    logs = [log_dir / f"{Path(config).stem}-node{rank}.log" for rank in range(machines)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall its node
            nodes.append(subprocess.Popen([*command, "--machine_rank", str(rank), *script], env=env, stderr=stderr))
    for node, log in zip(nodes, logs):
        assert node.wait(timeout=600) == 0, log.read_text()[-3000:]


def test_fsdp_on_one_node_trains_the_same_model_as_ddp_on_two_nodes(tmp_path):
    """The shipped configs on CPU: FSDP with 2 processes on one node, DDP with one process on each of 2 nodes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SHARDED_LOG": str(tmp_path / "sharded")}
    (tmp_path / "fsdp_on_cpu.py").write_text(CPU_FSDP_LAUNCHER)
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    # FSDP also writes a checkpoint at each step, gathered from the shards like the final model.
    fsdp_args = train_args(fsdp, "semantic", steps=2, extra=("--save_strategy", "steps", "--save_steps", "1"))
    launch("fsdp_1node_8gpu.yaml", 29541, [str(tmp_path / "fsdp_on_cpu.py"), *fsdp_args], env, tmp_path)
    ddp_args = train_args(ddp, "semantic", steps=2, extra=("--save_strategy", "no"))
    launch("ddp_2nodes_8gpu.yaml", 29542, ["-m", "modeling_eomt.train", *ddp_args], env, tmp_path, machines=2)

    for rank in range(2):  # each of the 2 EomtLayers is its own shard unit, the root model holds the rest
        sharded = (tmp_path / f"sharded{rank}").read_text().split()
        assert sharded.count("EomtLayer") == 2 and sharded[-1] == "EomtForUniversalSegmentation", sharded
    assert math.isfinite(loss := json.loads((fsdp / "train_results.json").read_text())["train_loss"]) and loss > 0
    model = EomtForUniversalSegmentation.from_pretrained(fsdp)  # the gathered weights form a whole model
    saved, oracle = load_file(fsdp / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert saved.keys() == oracle.keys() == model.state_dict().keys()
    for name in saved:  # the same averaged gradients, whether all-reduced (DDP) or reduce-scattered (FSDP)
        torch.testing.assert_close(saved[name], oracle[name], msg=name)
    first_step = load_file(fsdp / "checkpoint-1" / "model.safetensors")
    assert first_step.keys() == saved.keys()
    assert not all(torch.equal(first_step[name], saved[name]) for name in saved)  # the second step trained


@pytest.mark.parametrize("one_node", ["fsdp_1node_8gpu.yaml", "ddp_1node_8gpu.yaml"])
def test_launch_configs_describe_8_gpus_per_node(one_node):
    single = load_config_from_file(str(LAUNCH / one_node))
    double = load_config_from_file(str(LAUNCH / one_node.replace("1node", "2nodes")))
    assert (single.num_machines, single.num_processes, double.num_machines, double.num_processes) == (1, 8, 2, 16)
    assert double.main_process_ip and double.main_process_port and double.machine_rank == 0
    one, two = single.to_dict(), double.to_dict()
    differing = {key for key in one.keys() | two.keys() if one.get(key) != two.get(key)}
    assert differing <= MACHINE_FIELDS, differing
    if single.distributed_type == DistributedType.FSDP:
        assert single.fsdp_config["fsdp_version"] == 2
        assert (
            single.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in EomtForUniversalSegmentation._no_split_modules
        )
    else:
        assert single.distributed_type == DistributedType.MULTI_GPU


def test_torchrun_fsdp_arguments_match_the_accelerate_config(monkeypatch):
    """Without accelerate's launcher, `eomt-train --fsdp --fsdp_config ...` (the README's torchrun line) builds the
    FSDP plugin of `fsdp_1node_8gpu.yaml`."""
    from transformers import HfArgumentParser

    from modeling_eomt.training import EomtTrainingArguments

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # parsing sets it; restored after the test
    argv = ["--output_dir", "unused", "--fsdp", "--fsdp_config", TORCHRUN_FSDP_CONFIG]
    (args,) = HfArgumentParser(EomtTrainingArguments).parse_args_into_dataclasses(args=argv)
    plugin = {key.removeprefix("fsdp_"): value for key, value in args.fsdp_plugin_args.items()}
    accelerate_config = load_config_from_file(str(LAUNCH / "fsdp_1node_8gpu.yaml")).fsdp_config
    config = {key.removeprefix("fsdp_"): value for key, value in accelerate_config.items()}
    config["transformer_cls_names_to_wrap"] = config.pop("transformer_layer_cls_to_wrap")
    for key in ("version", "auto_wrap_policy", "transformer_cls_names_to_wrap", "state_dict_type"):
        assert plugin[key] == config[key], key
    assert plugin["reshard_after_forward"] is config["reshard_after_forward"] is True
