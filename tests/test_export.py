"""Export to GPTQ-v2 / compressed-tensors / dense, load_quantized, and refusals of bad input.

Models are built directly from random codes with zero points forced to the extremes 0 and
2^b - 1 (the values a GPTQ-v1 or an off-by-one layout would get wrong), at every bit width
and group 64/128, on a 2-layer Llama of hidden 128 so both group sizes divide every layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_pipeline, random_packed_model
from efficientqat import load_quantized
from efficientqat.errors import ConfigError, RunFolderError
from efficientqat.export import export
from efficientqat.exporters.common import packed_layers
from efficientqat.exporters.compressed_tensors import pack_words
from efficientqat.exporters.read_compressed_tensors import _unpack_rows
from efficientqat.packed_model import save_packed_model
from efficientqat.quantizer import QuantSpec
from efficientqat.run_folder import write_json

SETTINGS = [(b, g) for b in (2, 3, 4, 8) for g in (64, 128)]


@pytest.fixture(scope="module")
def tokenizer(model_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_factory("llama"))


def make_run(root: Path, tokenizer, bits: int, group: int, done: bool = True) -> Path:
    """A run folder shaped like Block-AP's / E2E-QP's: state.json + model/."""
    spec = QuantSpec(bits, group)
    save_packed_model(random_packed_model(len(tokenizer), spec), tokenizer, root / "model", spec)
    write_json(root / "state.json", {"stage": "blockap", "done": done})
    return root


@pytest.mark.parametrize("bits,group", SETTINGS)
@pytest.mark.parametrize("fmt", ["gptq_v2", "compressed_tensors", "dense"])
def test_export_round_trip(tmp_path, tokenizer, fmt, bits, group):
    run = make_run(tmp_path / "run", tokenizer, bits, group)
    result = export(run, fmt, tmp_path / "out")
    assert result["layers_checked"] == 14 and result["logits_rel_diff"] <= (3e-2 if fmt == "dense" else 1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # staging removed


def test_gptq_v2_config_fields(tmp_path, tokenizer):
    run = make_run(tmp_path / "run", tokenizer, 3, 128)
    export(run / "model", "gptq_v2", tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2" and qc["format"] == "gptq_v2"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (3, 128, False, False)
    assert json.loads((tmp_path / "out" / "quantize_config.json").read_text()) == qc
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # K = 256, N = 128, 3-bit dense stream
    assert t[f"{name}.qweight"].shape == (256 * 3 // 32, 128) and t[f"{name}.qweight"].dtype == torch.int32
    assert t[f"{name}.qzeros"].shape == (2, 128 * 3 // 32) and t[f"{name}.scales"].dtype == torch.float16
    assert torch.equal(t[f"{name}.g_idx"], torch.arange(256, dtype=torch.int32) // 128)


def test_compressed_tensors_layout(tmp_path, tokenizer):
    run = make_run(tmp_path / "run", tokenizer, 4, 64)
    export(run, "compressed_tensors", tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", False, "group", 64)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj"  # N = 64, K = 128
    assert t[f"{name}.weight_packed"].shape == (64, 16) and t[f"{name}.weight_zero_point"].shape == (8, 2)
    assert t[f"{name}.weight_scale"].shape == (64, 2) and t[f"{name}.weight_shape"].tolist() == [64, 128]


def test_compressed_tensors_3bit_is_a_dense_bit_stream():
    """32 three-bit values in 3 words, value 10 split over words 0/1 (compressed-tensors >= #732);
    a ragged row (20 values) takes ceil(20 * 3 / 32) = 2 words."""
    codes = (torch.arange(64).reshape(2, 32) * 5) % 8
    words = pack_words(codes, 3).to(torch.int64) & 0xFFFFFFFF
    stream = sum(int(words[0, w]) << (32 * w) for w in range(3))
    assert words.shape == (2, 3) and stream == sum(int(v) << (3 * i) for i, v in enumerate(codes[0]))
    assert torch.equal(_unpack_rows(pack_words(codes, 3), 3, 32) + 4, codes)
    assert pack_words(codes[:, :20], 3).shape == (2, 2)
    assert torch.equal(_unpack_rows(pack_words(codes[:, :20], 3), 3, 20) + 4, codes[:, :20])


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 64), (8, 128)])
def test_compressed_tensors_export_loads_in_transformers(tmp_path, tokenizer, bits, group):
    """The real compressed-tensors library (decompress on load) gives our logits."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    run = make_run(tmp_path / "run", tokenizer, bits, group)
    export(run, "compressed_tensors", tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    ours = load_quantized(run, device="cpu")
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 5e-3  # rounding of their dequantization (measured 1e-4..1e-3)


@pytest.mark.parametrize("target", ["run", "model", "gptq"])
def test_load_quantized_generates(tmp_path, tokenizer, target):
    run = make_run(tmp_path / "run", tokenizer, 2, 64)
    path = {"run": run, "model": run / "model"}.get(target)
    if target == "gptq":
        export(run, "gptq_v2", tmp_path / "gptq")
        path = tmp_path / "gptq"
    model = load_quantized(path, device="cpu")
    assert len(packed_layers(model)) == 8  # q/k/v and gate/up fused: 4 matmuls per layer
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    reference = load_quantized(run, device="cpu", fuse=False)
    assert len(packed_layers(reference)) == 14
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_quantized_can_add_fragment_order_codes(tmp_path, tokenizer):
    """``fragment_codes=True`` gives each (fused) packed layer its codes in fragment order, the
    repack of its own ``qweight``, outside the state dict; the model computes what it did without."""
    pytest.importorskip("triton")
    from efficientqat.kernels.fragments import fragment_codes

    run = make_run(tmp_path / "run", tokenizer, 2, 64)
    plain = load_quantized(run, device="cpu")
    model = load_quantized(run, device="cpu", fragment_codes=True)
    layers = packed_layers(model).values()
    assert len(layers) == 8 and all(layer.fragment_codes is not None for layer in layers)
    for layer in layers:
        torch.testing.assert_close(layer.fragment_codes, fragment_codes(layer.qweight, 2), rtol=0, atol=0)
    assert all(layer.fragment_codes is None for layer in packed_layers(plain).values())
    assert model.state_dict().keys() == plain.state_dict().keys()
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_static_cache_generate_compiles_the_packed_model(tmp_path, tokenizer):
    """``generate()`` with a static cache compiles the decode step (transformers' auto-compile)
    through our packed layers as one graph (``fullgraph``: any break fails), and its greedy
    tokens are the eager ones. On the GPU the layers are the Triton operator under inductor; on
    the CPU the dequantize-then-matmul path under the eager backend (no compiler needed)."""
    from transformers import CompileConfig

    cuda = torch.cuda.is_available()
    model = load_quantized(make_run(tmp_path / "run", tokenizer, 4, 64), device="cuda" if cuda else "cpu")
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids.to(model.device)
    eager = model.generate(ids, max_new_tokens=6, do_sample=False)
    config = CompileConfig(fullgraph=True) if cuda else CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = not cuda  # transformers compiles on accelerators only unless told
    compiled = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                              compile_config=config)
    assert hasattr(model, "_compiled_call")  # the compiled forward was built and used
    assert torch.equal(compiled, eager)


def test_bad_inputs_leave_everything_untouched(tmp_path, tokenizer):
    unfinished = make_run(tmp_path / "unfinished", tokenizer, 4, 64, done=False)
    with pytest.raises(RunFolderError, match="not finished"):
        export(unfinished, "gptq_v2", tmp_path / "a")
    run = make_run(tmp_path / "run", tokenizer, 4, 64)
    with pytest.raises(ConfigError, match="unknown"):
        export(run, "onnx", tmp_path / "b")
    with pytest.raises(ConfigError, match="zero - 1"):
        export(run, "gptq_v1", tmp_path / "c")
    with pytest.raises(ConfigError, match="dtype"):
        export(run, "dense", tmp_path / "d", dtype="int8")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        export(run, "gptq_v2", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(RunFolderError, match="neither a run folder"):
        export(tmp_path / "nowhere", "gptq_v2", tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "run", "unfinished"]


def test_export_of_a_blockap_run(tmp_path, tiny_overrides):
    from conftest import compose
    from efficientqat.blockap import run_blockap

    run_blockap(compose("blockap", tiny_overrides("llama", "w2g64") + ["quant.group_size=32"]), tmp_path / "run")
    result = export(tmp_path / "run", "compressed_tensors", tmp_path / "ct")
    assert result["layers_checked"] == 14


def test_bench_generate_smoke(tmp_path):
    """The generation benchmark's CPU-side logic on a tiny model (the real run needs a GPU)."""
    bench = load_pipeline("bench_generate")
    rows = bench.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--batches", "1,2", "--settings", "w2g64",
                       "--profile", "--sdpa", "math"])
    assert [r["model"] for r in rows] == ["FP16", "w2g64"] and rows[1]["bytes"] < rows[0]["bytes"]
    assert all(r["decode"][b]["tokens_per_s"] > 0 for r in rows for b in (1, 2))
    assert all(r["prefill_tokens_per_s"] > 0 and r["prefill_mode"] == "eager" for r in rows)  # no graphs on a CPU
    data = json.loads((tmp_path / "bench_generate.json").read_text())
    assert data["rows"][1]["model"] == "w2g64" and data["fused"] and isinstance(data["kernel_configs"], dict)
    assert data["sdpa"] == "math"
    with bench.attention_kernels("efficient"):  # what --sdpa leaves torch to choose from, restored after
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    for row in rows:
        prof = row["decode"][1]["profile"]
        assert 0 < prof["kernel_us_per_step"] <= 1.05 * prof["wall_us_per_step"] and prof["launches_per_step"] >= 1
        assert abs(sum(prof["us_per_step"].values()) - prof["kernel_us_per_step"]) < 1e-6 * prof["kernel_us_per_step"] + 1e-9
        assert prof["top_kernels"] and prof["top_kernels"][0]["us"] >= prof["top_kernels"][-1]["us"]
        assert sum(k["launches"] for k in prof["top_kernels"]) <= prof["launches_per_step"] + 1e-9
        assert all(k["launches"] > 0 for k in prof["top_kernels"])


def test_bench_generate_fragments_give_every_packed_layer_its_fragment_order_codes():
    """``--fragments``: every packed layer of the quantized model (fused q/k/v and gate/up included)
    holds its codes again in fragment order, outside the state dict; the model's bytes count them."""
    from efficientqat.qlinear import PackedLinear
    from efficientqat.quantizer import QuantSpec

    bench = load_pipeline("bench_generate")
    spec = QuantSpec.from_name("w2g64")
    plain = bench.build_model(bench.TINY, spec, torch.device("cpu"), True, False)
    model = bench.build_model(bench.TINY, spec, torch.device("cpu"), True, False, fragments=True)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.fragment_codes is not None for m in packed)
    assert all(m.fragment_codes is None for m in plain.modules() if isinstance(m, PackedLinear))
    assert bench.model_bytes(model) - bench.model_bytes(plain) == sum(m.qweight.numel() * 4 for m in packed)
    assert not any("fragment_codes" in key for key in model.state_dict())


def test_bench_generate_names_an_unknown_setting(capsys):
    bench = load_pipeline("bench_generate")
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x", "--settings", "w4g128,w5g128"])
    assert "unknown --settings w5g128: choose from w2g64,w3g128,w4g128" in capsys.readouterr().err


def test_bench_generate_no_pdl_turns_chained_decode_launches_off(monkeypatch):
    """``--no-pdl`` launches the decode tiles as timed, without programmatic dependent launch
    (the default where the device supports it: ``tuning.chains_decode_launches``)."""
    from efficientqat.kernels import tuning

    bench = load_pipeline("bench_generate")
    monkeypatch.setattr(tuning, "pdl_supported", lambda device: True)
    monkeypatch.delenv("EFFICIENTQAT_PDL", raising=False)
    assert not bench.parse_args(["--out", "x"]).no_pdl and tuning.chains_decode_launches(torch.device("cpu"))
    monkeypatch.setenv("EFFICIENTQAT_PDL", "1")  # recorded, so the "0" that --no-pdl writes is undone after the test
    bench.apply_launch_options(bench.parse_args(["--out", "x", "--no-pdl"]))
    assert not tuning.chains_decode_launches(torch.device("cpu"))


def test_step_profile_sorts_kernel_names_into_families():
    family = load_pipeline("step_profile").family

    assert family("_dq_gemv_half2_kernel") == "packed matmul (ours)"
    assert family("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "fused elementwise (inductor)"
    assert family("sm90_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize64x64x64") == "cuBLAS / CUTLASS matmul"
    assert family("void pytorch_flash::flash_fwd_splitkv_kernel<...>") == "attention"
    assert family("Memset (Device)") == "torch elementwise (memset, copies, casts)"
    assert family("ncclKernel_AllReduce") == "other"


def test_lm_eval_on_a_local_task(tmp_path, tokenizer):
    """lm-eval over a two-question local multiple-choice task (skipped without lm_eval)."""
    pytest.importorskip("lm_eval")
    from efficientqat.lm_eval_adapter import zero_shot_accuracy

    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"question": "the quick brown", "choices": ["fox", "sea"], "label": 0},
        {"question": "lazy", "choices": ["stars", "dog"], "label": 1},
    ]) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    run = make_run(tmp_path / "run", tokenizer, 4, 64)
    model = load_quantized(run, device="cpu")
    acc = zero_shot_accuracy(model, tokenizer, ["tiny_mc"], batch_size=2, task_paths=[str(tmp_path)])
    assert acc["tiny_mc"] in (0.0, 0.5, 1.0)  # two questions
    assert model.config.quantization_config["quant_method"] == "efficientqat"  # hidden from lm-eval, restored
