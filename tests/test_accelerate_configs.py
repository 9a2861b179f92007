"""accelerate_configs/*.yaml: each file loads with accelerate's own loader, holds what its name promises, and
resolves through `accelerate launch`'s own argument handling to the environment and plugin a GPU run would get
(DeepSpeed itself is not needed for that: accelerate builds the plugin from environment variables)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "accelerate_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))

# file -> (distributed type, processes, machines, mixed precision, ZeRO stage or None)
EXPECTED = {
    "cpu_2proc": (DistributedType.MULTI_GPU, 2, 1, "no", None),
    "ddp": (DistributedType.MULTI_GPU, 8, 1, "bf16", None),
    "zero2": (DistributedType.DEEPSPEED, 8, 1, "bf16", 2),
    "zero3": (DistributedType.DEEPSPEED, 8, 1, "bf16", 3),
    "multi_node_zero3": (DistributedType.DEEPSPEED, 16, 2, "bf16", 3),
    "fsdp": (DistributedType.FSDP, 8, 1, "bf16", None),
}


def resolve(name: str, *cli: str):
    """What `accelerate launch --config_file accelerate_configs/<name>.yaml <cli> script.py` decides, without
    starting anything: the validated arguments and the environment the training processes would receive."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIG_DIR / f"{name}.yaml"), *cli, "examples/train_aapo.py", "--config", "r.yaml"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # what launch_command sets
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def test_the_issue_lists_every_file():
    assert {path.stem for path in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_loads_with_accelerates_loader(path):
    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    distributed, processes, machines, precision, stage = EXPECTED[path.stem]
    assert config.distributed_type == distributed
    assert (config.num_processes, config.num_machines, config.mixed_precision) == (processes, machines, precision)
    assert config.use_cpu is False and config.compute_environment.value == "LOCAL_MACHINE"
    if stage is None:
        assert config.deepspeed_config == {}
    else:
        assert config.deepspeed_config["zero_stage"] == stage
        assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    # every file says how to launch with it
    assert f"--config_file accelerate_configs/{path.name}" in path.read_text() or path.stem == "cpu_2proc"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_nested_keys_are_launch_options(path):
    """accelerate copies deepspeed_config / fsdp_config entries onto `accelerate launch` options without checking
    them: a misspelt key would be silently ignored, so every one must be a real option."""
    config = load_config_from_file(str(path))
    options = {action.dest for action in launch_command_parser()._actions}
    nested = list(config.deepspeed_config) + list(config.fsdp_config) + [f"dynamo_{k}" for k in config.dynamo_config]
    assert set(nested) <= options, sorted(set(nested) - options)


def test_zero2_resolves_to_stage_2_with_optional_optimizer_offload():
    args, env = resolve("zero2")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    with patch_environment(**env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 2 and plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "none"

    args, env = resolve("zero2", "--offload_optimizer_device", "cpu")  # the documented opt-in
    with patch_environment(**env):
        plugin = DeepSpeedPlugin()
    assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert args.mixed_precision == "bf16" and args.num_processes == 8


@pytest.mark.parametrize("name", ["zero3", "multi_node_zero3"])
def test_zero3_resolves_to_stage_3_saving_a_16bit_model(name):
    _, env = resolve(name, "--machine_rank", "1", "--main_process_ip", "10.1.2.3") if name.startswith("multi") else resolve(name)
    with patch_environment(**env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 3 and plugin.zero3_init_flag
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_multi_node_placeholders_are_documented_and_overridden_on_the_command_line():
    text = (CONFIG_DIR / "multi_node_zero3.yaml").read_text()
    for key in ("machine_rank", "main_process_ip"):
        assert re.search(rf"^#\s+{key}\s+PLACEHOLDER", text, re.M), f"{key} must be documented as a placeholder"
    assert "--machine_rank" in text and "--main_process_ip" in text and "--main_process_port" in text

    args, _ = resolve("multi_node_zero3", "--machine_rank", "1", "--main_process_ip", "10.1.2.3",
                      "--main_process_port", "29511")
    assert (args.num_machines, args.machine_rank, args.main_process_ip) == (2, 1, "10.1.2.3")
    # what torchrun receives on node 1: 8 local processes out of 16, rendezvous at the main node
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert args.rdzv_endpoint == "10.1.2.3:29511"


def test_fsdp_resolves_to_fsdp2_with_a_full_state_dict():
    args, env = resolve("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.cpu_ram_efficient_loading is True and plugin.auto_wrap_policy is not None


def test_ddp_and_cpu_2proc_start_several_processes_through_torchrun():
    args, env = resolve("ddp", "--num_processes", "2")
    assert args.multi_gpu and args.nproc_per_node == "2" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    args, env = resolve("cpu_2proc")  # what tests/test_multiprocess.py launches (gloo on a CPU-only machine)
    assert args.multi_gpu and not args.cpu and args.nproc_per_node == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
