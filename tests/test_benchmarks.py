"""The kernel benchmark runs end to end on CPU with small shapes and writes its report."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quantized_linears as bench  # noqa: E402


def test_kernel_benchmark_writes_json_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "QUICK_SHAPES", [(64, 128)])
    monkeypatch.setattr(bench, "QUICK_M", [1, 16])
    monkeypatch.setattr(bench, "QUICK_E2E_TOKENS", 4)
    report = bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert saved["ceilings"]["bandwidth_bytes_per_s"] > 0 and saved["ceilings"]["matmul_flops_per_s"] > 0
    timed = {(r["variant"], r["M"]) for r in saved["layers"] if "ms" in r}
    for variant in ("bf16", "qpass nf4", "qpass fp4", "qpass int8", "qpass nf4 compiled", "bnb nf4+dq",
                    "bnb int8 (t=6)"):
        assert {(variant, 1), (variant, 16)} <= timed, variant
    # peers that cannot run here are listed with the reason, not dropped
    assert all("ms" in r or r["skipped"] for r in saved["layers"])
    # every timed output is checked: qpass' against its reference op (within two bf16 roundings), and each
    # format's error against the unquantized layer that of its bitsandbytes twin (the same bytes)
    rows = {(r["variant"], r["M"]): r for r in saved["layers"] if "ms" in r}
    assert all(0 <= r["error_vs_unquantized"] < 0.5 for r in rows.values())
    qpass_rows = [r for (variant, _), r in rows.items() if variant.startswith("qpass")]
    assert len(qpass_rows) == 12 and not any(bench.is_wrong(r["error_vs_reference"]) for r in qpass_rows)
    for m in (1, 16):
        twins = rows[("qpass nf4", m)]["error_vs_unquantized"], rows[("bnb nf4+dq", m)]["error_vs_unquantized"]
        assert 0.02 < twins[0] < 0.2 and abs(twins[0] - twins[1]) < 0.02 * twins[0], twins
        assert rows[("bf16", m)]["error_vs_unquantized"] < 4e-3  # its output's rounding alone
    # torchao (a test dependency): int8 weight-only runs on CPU, eager and compiled; NF4 needs more than
    # 64 x 256 weights and int4 (tinygemm) CUDA, so here they are rows with the reason
    assert {("torchao int8 w-only", 1), ("torchao int8 w-only compiled", 16)} <= timed
    reasons = {r["variant"]: r["skipped"] for r in saved["layers"]
               if r["variant"].startswith("torchao") and "ms" not in r}
    assert "scaler block size" in reasons["torchao nf4"] and reasons.keys() >= {"torchao nf4 compiled",
                                                                              "torchao int4 w-only"}
    e2e = {(r["variant"], r["batch"]) for r in saved["end_to_end"] if "tokens_per_s" in r}
    assert {("bf16", 1), ("qpass nf4", 16), ("qpass int8", 1), ("bnb nf4+dq", 1)} <= e2e
    assert (tmp_path / "kernels_cpu.png").stat().st_size > 0
    table = (tmp_path / "kernels_cpu.md").read_text()
    assert "| 64 x 128 | 1 | qpass nf4 |" in table and "error vs unquantized / vs reference" in table
    assert report["device"]


def test_kernel_benchmark_runs_in_parts(tmp_path):
    """--part/--shapes/--ms/--tag split a GPU run into calls that fit the device's time limit."""
    bench.main(["--device", "cpu", "--part", "layers", "--shapes", "32x64", "--ms", "2", "--tag", "part1",
                "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "kernels_part1.json").read_text())
    assert {(r["N"], r["K"], r["M"]) for r in saved["layers"]} == {(32, 64, 2)}
    assert saved["end_to_end"] == [] and "--tag part1" in saved["command"]
    try:
        bench.main(["--device", "cpu", "--part", "e2e", "--e2e-variants", "bf16,fp8", "--out", str(tmp_path)])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("an unknown decode variant must be refused")


def test_sweep_times_every_config_and_split(tmp_path):
    """benchmarks/sweep_configs.py (what a GPU session runs to set the configs and split heuristics)
    times each config of the kernel that M picks, at each split count, next to bf16 and the op's own
    choice: for NF4 (GEMV at M = 1, GEMM above) and for int8."""
    import sweep_configs

    for fmt, expected in (("nf4", ((1, "gemv"), (16, "gemm"))), ("int8", ((1, "int8 gemm"), (16, "int8 gemm")))):
        sweep_configs.main(["--format", fmt, "--device", "cpu", "--shape", "32x128", "--ms", "1,16", "--splits", "1",
                            "--out", str(tmp_path)])
        saved = json.loads((tmp_path / f"sweep_{fmt}_cpu.json").read_text())
        rows = saved["rows"]
        assert (saved["format"], saved["N"], saved["K"]) == (fmt, 32, 128) and all(r["ms"] > 0 for r in rows)
        layer = sweep_configs.LAYERS[fmt](torch.randn(32, 128, dtype=torch.bfloat16) * 0.02)
        for m, kernel in expected:
            kind, configs = layer.kernels(m)
            timed = [r for r in rows if r["M"] == m and "config" in r]
            assert kind == kernel and all(r["kernel"] == kernel for r in timed)
            assert sorted(str(r["config"]) for r in timed) == sorted(str(c.kwargs) for c in configs)  # one split each
            checked = [r["error_vs_reference"] for r in rows if r["M"] == m and "kernel" in r]
            assert len(checked) == len(timed) + 1 and not any(map(bench.is_wrong, checked)), checked
            assert any(r["variant"] == "bf16 F.linear" for r in rows if r["M"] == m)
            assert any(r["variant"].startswith("op's choice") for r in rows if r["M"] == m)


def test_sweep_can_time_only_some_configs(tmp_path):
    """--match keeps the configs whose text matches (a short GPU call can time just the new ones); the
    bf16 and op's-choice rows stay."""
    import sweep_configs

    sweep_configs.main(["--device", "cpu", "--shape", "32x128", "--ms", "16", "--splits", "1",
                        "--match", "SWAP_AB: True", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "sweep_nf4_cpu.json").read_text())["rows"]
    timed = [r for r in rows if "config" in r]
    wanted = [c for c in sweep_configs.LAYERS["nf4"](torch.randn(32, 128) * 0.02).kernels(16)[1] if c.kwargs["SWAP_AB"]]
    assert wanted and sorted(str(r["config"]) for r in timed) == sorted(str(c.kwargs) for c in wanted)
    assert {r["variant"].split(" (")[0] for r in rows if "config" not in r} == {"bf16 F.linear", "op's choice"}

def test_switched_variants_take_the_other_path_for_one_call():
    """The GPU-only variants that place each format's switch to cuBLAS set it during their call only,
    and are timed only at the M where they take another path than the op's own."""
    for name, switched in bench.SWITCHED.items():
        kernels = switched.kernels()
        before = getattr(kernels, switched.switch)
        seen = []
        bench._with_switch(lambda x: seen.append(getattr(kernels, switched.switch)), switched)(None)
        assert seen == [switched.forced] and getattr(kernels, switched.switch) == before, name
        fused = switched.forced > before
        assert [m for m in (1, 16, 17, before - 1, before, 2 * before) if switched.differs_at(m)] == (
            [before, 2 * before] if fused else [17, before - 1]), name


def test_host_overhead_benchmark_times_each_launcher(tmp_path):
    """The eager host-time benchmark runs the CUDA launchers' Python on the CPU (launches stubbed out) and
    counts their Triton launches: the GEMV alone for NF4 at M = 1; the row quantization and the GEMM for
    int8, with the outlier-column pass before them from two rows on."""
    import host_overhead

    host_overhead.main(["--shape", "256x256", "--ms", "1,16", "--calls", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "host_overhead_cpu.json").read_text())
    launches = {(r["format"], r["M"]): r["kernel_launches"] for r in saved["rows"]}
    assert launches == {("nf4", 1): 1, ("nf4", 16): 1, ("int8", 1): 2, ("int8", 16): 3}
    assert all(r["launcher_us"] > 0 and r["shape"] == "256x256" for r in saved["rows"])


def test_dequantize_benchmark_times_every_library_and_checks_qpass_against_bitsandbytes(tmp_path, monkeypatch):
    """benchmarks/dequantize.py decodes a whole weight with qpass (eager, through the blocks of rows
    here, and compiled), bitsandbytes and torchao, beside a bf16 copy, and records that qpass' result is
    bitsandbytes' bit for bit (the same bytes decoded)."""
    import dequantize

    from qpass.kernels import ops

    monkeypatch.setattr(ops, "BLOCK_WEIGHTS", 64 * 512)  # 256 x 512: 4 blocks of 64 rows
    dequantize.main(["--device", "cpu", "--shapes", "256x512", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in json.loads((tmp_path / "dequantize_cpu.json").read_text())["rows"]}
    for fmt in ("nf4", "int8"):
        for variant in (f"qpass {fmt}", f"qpass {fmt} compiled"):
            assert rows[variant]["ms"] > 0 and rows[variant]["equal_to_bitsandbytes"] is True, variant
        assert rows[f"bnb {fmt}"]["ms"] > 0 and rows[f"torchao {fmt}"]["ms"] > 0
        # NF4's widest half step is 0.14 of a block's absmax (under 0.1 here); int8's is 0.5/127 of a row's
        assert 0 < rows[f"qpass {fmt}"]["max_abs_error"] < (0.03 if fmt == "nf4" else 1e-3)
    assert rows["bf16 copy"]["max_abs_error"] == 0
    table = (tmp_path / "dequantize_cpu.md").read_text()
    assert "| 256 x 512 | qpass nf4 |" in table and "| yes |" in table and "NO" not in table
