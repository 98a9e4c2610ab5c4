"""Which compute dtype a run trains in. bf16 autocast on a CPU without native bf16 (no AVX512-BF16, no
AMX: an AMD EPYC of this kind, for one) is emulated: a step of the demo took 137 s instead of 4.5 s in
fp32, and the demo's 60-second budget trained a single step."""

from __future__ import annotations

import pytest
import torch
from distillery_trainer.train import modeling
from distillery_trainer.train.modeling import autocast_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_is_used_only_where_the_cpu_computes_it_natively(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else None
    assert autocast_dtype("auto", CPU) is expected
    assert autocast_dtype("bf16", CPU) is expected
    if not native:
        assert "emulated" in caplog.text and "fp32" in caplog.text


def test_fp32_and_fp16_are_as_asked() -> None:
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("fp16", CPU) is torch.float16


def test_this_machine_is_asked_what_it_has() -> None:
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    from distillery_trainer.devices import cpu_has_native_bf16

    assert cpu_has_native_bf16() is has


@pytest.mark.parametrize(("native", "asked", "served"), [
    (False, "bfloat16", "float32"), (False, "auto", "float32"), (False, "float16", "float16"),
    (True, "bfloat16", "bfloat16"), (True, "auto", "auto"),
])  # fmt: skip
def test_the_cpu_build_of_vllm_serves_bf16_only_where_the_cpu_computes_it(
    native: bool, asked: str, served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distillery_trainer.serve import launcher
    from distillery_trainer.serve.args import VllmServer

    monkeypatch.setattr(launcher, "cpu_has_native_bf16", lambda: native)
    cpu = launcher.VllmLauncher(
        VllmServer(model="m", served_model_name="s", dtype=asked, port=1), build="cpu"
    )
    assert cpu.server.dtype == served and cpu.argv()[cpu.argv().index("--dtype") + 1] == served
    gpu = launcher.VllmLauncher(
        VllmServer(model="m", served_model_name="s", dtype=asked, port=1), build="gpu"
    )
    assert gpu.server.dtype == asked
