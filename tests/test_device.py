"""The policy's device (secure_mor.device): CUDA when asked for or seen, the CPU otherwise. No GPU here:
where one would be, torch.cuda is mocked."""

from unittest import mock

import pytest

from secure_mor.device import resolve_device, trainer_arguments
from secure_mor.server.grpo import GRPOSettings, grpo_arguments, grpo_config
from secure_mor.server.pipeline import AlignConfig, AlignError, align
from secure_mor.server.transport import LocalTransport


def cuda(available: bool, bf16: bool = True):
    return mock.patch.multiple("torch.cuda", is_available=mock.Mock(return_value=available),
                               is_bf16_supported=mock.Mock(return_value=bf16))


def test_auto_takes_cuda_when_torch_sees_it_and_the_cpu_otherwise():
    with cuda(False):
        assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda")
    with cuda(True):
        assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
        assert resolve_device("cpu") == "cpu"  # asked for: the CPU even beside a GPU
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")


def test_trainers_run_on_cuda_in_bf16_where_supported_and_on_the_cpu_in_float32(tmp_path):
    assert trainer_arguments("cpu") == {"use_cpu": True, "bf16": False}
    with cuda(True, bf16=True):
        assert trainer_arguments("cuda") == {"use_cpu": False, "bf16": True}
    with cuda(True, bf16=False):
        assert trainer_arguments("cuda") == {"use_cpu": False, "bf16": False}
    # GRPO's TRL config on each device (TrainingArguments checks the hardware itself: recorded, not built, for cuda)
    config = grpo_config(GRPOSettings(), tmp_path)
    assert config.use_cpu and not config.bf16
    with cuda(True, bf16=True):
        arguments = grpo_arguments(GRPOSettings(), tmp_path, device="cuda")
    assert arguments["use_cpu"] is False and arguments["bf16"] is True


def test_align_refuses_cuda_without_a_gpu_before_any_work(tmp_path):
    with cuda(False), pytest.raises(AlignError, match="torch sees no CUDA device"):
        align(LocalTransport({}), tmp_path, AlignConfig(device="cuda"), log=lambda m: None)
    assert not any(tmp_path.iterdir())
