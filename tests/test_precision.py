import pytest
import torch

from chipprune.training.precision import FLOAT32, choose, native_bf16


@pytest.mark.parametrize(
    ("capabilities", "amp", "why"),
    [
        ({"amx_bf16": True, "avx512_bf16": True}, "bf16", "CPU with AMX-BF16"),
        ({"amx_bf16": False, "avx512_bf16": True}, "bf16", "CPU with AVX512-BF16"),
        ({"amx_bf16": False, "avx512_bf16": False, "avx512": True}, "off", "no native bf16"),
        ({}, "off", "no native bf16"),
    ],
)
def test_auto_is_bf16_with_channels_last_only_where_the_cpu_computes_bf16(monkeypatch, capabilities, amp, why):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    precision = choose("auto", None, torch.device("cpu"))
    assert (precision.amp, precision.channels_last) == (amp, amp == "bf16")
    assert why in precision.why and why in precision.describe()


def test_auto_on_cuda_asks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose("auto", None, torch.device("cuda")).amp == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    fp32 = choose("auto", None, torch.device("cuda"))
    assert fp32.amp == "off" and fp32.channels_last, "cuDNN prefers channels_last in float32 too"


def test_explicit_choices_win(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert choose("off", None, torch.device("cpu")) == choose("off", False, torch.device("cpu"))
    assert choose("auto", False, torch.device("cpu")).channels_last is False
    assert choose("bf16", None, torch.device("cpu")).why == "asked"
    assert native_bf16(torch.device("meta")) is None
    with pytest.raises(ValueError, match="amp must be one of auto"):
        choose("int8", None, torch.device("cpu"))


def test_float32_is_a_no_op_and_bf16_autocasts():
    x = torch.randn(4, 4)
    with FLOAT32.autocast(torch.device("cpu")):
        assert (x @ x).dtype == torch.float32
    with choose("bf16", None, torch.device("cpu")).autocast(torch.device("cpu")):
        assert (x @ x).dtype == torch.bfloat16
