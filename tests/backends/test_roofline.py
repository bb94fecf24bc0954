"""The static GPU model (kernels/roofline.py): every specialization the package launches compiles for sm_80
and sm_90 with sane numbers, the bound formulas and the SASS reading are right on hand-made inputs, and the
kernels meet issue 11's predicted budgets (or, where not yet, do not regress)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastgradstats.kernels import roofline

ARCHS = (80, 90)
STAGE1_FAMILIES = ("tensor_stats", "tensor_stats_log2", "tensor_stats_linear", "linear_hist", "pair_stats",
                   "pair_stats_origin")
DTYPES = ("fp32", "bf16", "fp16")
LISTING_VARIANTS = ("import json; from fastgradstats.kernels.roofline import variants; print(json.dumps("
                    "[[name, kernel.__name__, signature, sorted(constexprs), warps] "
                    "for name, kernel, signature, constexprs, warps in variants()]))")


@pytest.fixture(scope="module")
def compiled():
    """{arch: {name: model as a dict}} and the variants() listing, from subprocesses run side by side: the
    compiler needs Triton without its interpreter, which this test process runs under on a CPU machine."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    commands = {arch: ["-m", "fastgradstats.kernels.roofline", "--arch", str(arch), "--json"]
                for arch in ARCHS}
    commands["variants"] = ["-c", LISTING_VARIANTS]
    runs = {key: subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for key, command in commands.items()}
    outputs = {}
    for key, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-4000:]
        outputs[key] = json.loads(stdout)
    models = {arch: {m["name"]: m for m in outputs[arch]} for arch in ARCHS}
    return {**models, "variants": outputs["variants"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launched_family_compiles_for_every_dtype(compiled, arch):
    names = set(compiled[arch])
    missing = {f"{family}[{dtype}]" for family in STAGE1_FAMILIES for dtype in DTYPES} - names
    assert not missing, sorted(names)
    assert any(name.startswith("merge") for name in names)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_numbers_are_sane(compiled, arch):
    for name, m in compiled[arch].items():
        assert m["registers"] > 0 and m["shared_bytes"] >= roofline.RESERVED_SMEM, name
        assert m["warps_per_sm"] >= 1 and m["warps_per_sm"] == m["ctas_per_sm"] * m["num_warps"], name
        assert m["load_bytes_per_thread"] > 0 and m["elements_per_thread"] > 0, name
        assert m["instructions_per_element"] > 0 and m["loop_instructions"] > 0, name
        assert m["bytes_in_flight_per_sm"] == m["warps_per_sm"] * 32 * m["load_bytes_per_thread"], name
        assert m["loop_found"] or m["family"] not in STAGE1_FAMILIES, name
        assert [p["gpu"] for p in m["predictions"]] == [gpu.name for gpu in roofline.GPUS[arch]], name
        for p in m["predictions"]:
            assert p["issue_bound"] > 0 and p["little_bound"] > 0 and 0 < p["fraction"] <= 1, (name, p)


def test_variants_yield_name_kernel_signature_constexprs_and_warps(compiled):
    listing = {name: rest for name, *rest in compiled["variants"]}
    assert set(listing) == set(compiled[90])
    kernel, signature, constexprs, warps = listing["tensor_stats_log2[bf16]"]
    assert kernel == "_chunk_kernel" and warps == 8
    assert signature["tensor_table"] == "*i64" and "BLOCK" in constexprs


STREAMING_FAMILIES = ("tensor_stats", "tensor_stats_log2", "pair_stats", "pair_stats_origin")


def _fractions(model: dict) -> dict[str, float]:
    return {p["gpu"]: p["fraction"] for p in model["predictions"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_statistics_are_predicted_near_the_read_floor(compiled, arch):
    """Issue 11's budget: every data-streaming statistics variant at >= 0.85 of the read floor, with >= 24 KB
    of loads in flight per SM."""
    for family in STREAMING_FAMILIES:
        for dtype in DTYPES:
            m = compiled[arch][f"{family}[{dtype}]"]
            assert min(_fractions(m).values()) >= 0.85, (m["name"], _fractions(m))
            assert m["bytes_in_flight_per_sm"] >= 24 * 1024, m["name"]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_rows_pass_before_a_data_range_histogram_is_the_plain_statistics_kernel(compiled, arch):
    """dispatch runs the rows pass of a linear histogram over data ranges with no histogram: the same
    specialization as tensor_stats (one compile less), then the linear_hist pass."""
    for dtype in DTYPES:
        assert f"tensor_stats_ranges[{dtype}]" not in compiled[arch]
        assert f"linear_hist[{dtype}]" in compiled[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_without_histogram_have_no_barrier_in_their_loop(compiled, arch):
    for family in ("tensor_stats", "pair_stats", "pair_stats_origin"):
        for dtype in DTYPES:
            assert compiled[arch][f"{family}[{dtype}]"]["barriers_per_iteration"] == 0, (family, dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_histogram_barriers_and_linear_passes_do_not_regress(compiled, arch):
    """Issue 11's linear budget (>= 0.6) holds for the histogram-only pass and for every fixed-range
    statistics pass (16-bit: 0.63-0.64 of the H200 floor, 0.90-0.92 on an H100). tl.histogram issues 3 CTA
    barriers per call, one call per tile (the budget is one per 16K elements)."""
    for dtype in DTYPES:
        m = compiled[arch][f"tensor_stats_log2[{dtype}]"]
        assert m["barriers_per_iteration"] <= 3 and m["elements_per_cta_iteration"] >= 4096, m["name"]
        m = compiled[arch][f"linear_hist[{dtype}]"]
        assert min(_fractions(m).values()) >= 0.6, (m["name"], _fractions(m))
        m = compiled[arch][f"tensor_stats_linear[{dtype}]"]
        assert min(_fractions(m).values()) >= (0.85 if dtype == "fp32" else 0.6), (m["name"], _fractions(m))


def test_issue_and_little_bounds_on_a_toy_gpu():
    # 3.2 TB/s over 100 SMs at 2 GHz: 8 two-byte elements per clock per SM arrive; 4 x 32 / 32 = 4 are issued.
    toy = roofline.Gpu("toy", sms=100, clock_ghz=2.0, bandwidth_tbs=3.2)
    assert roofline.issue_bound(32, 2, toy) == pytest.approx(0.5)
    assert roofline.issue_bound(32, 4, toy) == pytest.approx(1.0)
    # Little's law: 3.2e12 B/s x 600 ns / 100 SMs = 19200 bytes in flight per SM.
    assert roofline.little_bound(9600, toy) == pytest.approx(0.5)
    prediction = roofline.predict(32, 2, 9600 * 3, toy)
    assert (prediction.issue_bound, prediction.little_bound) == (pytest.approx(0.5), pytest.approx(1.5))
    assert prediction.fraction == pytest.approx(0.5)
    assert roofline.predict(8, 2, 19200 * 2, toy).fraction == 1.0


def test_bounds_reproduce_the_design_notes_for_the_h200():
    # DESIGN.md section 5: ~14 SASS instructions per bf16 element and ~22 KB in flight per SM reach the floor.
    h200 = {gpu.name: gpu for gpu in roofline.GPUS[90]}["H200"]
    assert roofline.issue_bound(13.9, 2, h200) == pytest.approx(1.0, rel=0.01)
    assert roofline.little_bound(21.8e3, h200) == pytest.approx(1.0, rel=0.01)
    assert roofline.little_bound(4096, h200) == pytest.approx(0.19, abs=0.005)


@pytest.mark.parametrize(("registers", "shared", "warps", "expected"), [
    (179, 1280, 8, (1, "registers")),  # 184 x 32 x 8 = 47104 of 65536
    (128, 1280, 8, (2, "registers")),
    (129, 1280, 8, (1, "registers")),  # rounds up to 136 per thread
    (72, 1056, 8, (3, "registers")),
    (24, 1280, 4, (16, "warps")),
    (32, 100_000, 4, (2, "shared")),  # 228 KB / 100096 bytes
])
def test_resident_ctas_round_registers_per_warp(registers, shared, warps, expected):
    resources = roofline.Resources(registers, shared, 0)
    assert roofline.resident_ctas(resources, warps, roofline.SM_LIMITS[90]) == expected


TOY_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
                                                                                /* 0x000fe40000000800 */
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;              /* 0x0000000402027981 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R8.64] ;             /* 0x0000000408047981 */
        /*0030*/              @!P0 BRA 0x50 ;                                   /* 0x0000000000088947 */
        /*0040*/                   LDG.E.U16 R9, desc[UR4][R8.64+0x2] ;         /* 0x0000020408097981 */
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                /* 0x0000000000007b1d */
        /*0060*/                   ATOMS.POPC.INC.32 RZ, [R27+URZ+-0x13c] ;     /* 0xfffec4001bff7f8c */
        /*0070*/               @P0 BRA 0x20 ;                                   /* 0xfffffffc00e80947 */
        /*0080*/                   IADD3 R0, R0, 0x1, RZ ;                      /* 0x0000000100007810 */
        /*0090*/                   ISETP.GE.AND P1, PT, R0, 0x40, PT ;          /* 0x000000400000780c */
        /*00a0*/                   FADD R4, R4, R5 ;                            /* 0x0000000504047221 */
        /*00b0*/               @P1 BRA 0x80 ;                                   /* 0xfffffffc00f01947 */
        /*00c0*/                   EXIT ;                                       /* 0x000000000000794d */
        /*00d0*/                   BRA 0xd0;                                    /* 0xfffffffc00fc7947 */
"""


def test_steady_loop_is_the_longest_backward_branch_that_loads():
    instructions = roofline.parse_sass(TOY_SASS)
    assert len(instructions) == 14 and instructions[3].opcode == "BRA" and instructions[3].text == "BRA 0x50"
    loop, found = roofline.steady_loop(instructions)
    assert found and [ins.address for ins in loop] == list(range(0x20, 0x80, 0x10))
    assert sum(roofline.load_bytes(ins.opcode) for ins in loop) == 16 + 2
    no_loop, found = roofline.steady_loop(instructions[:3])
    assert not found and no_loop == instructions[:3]


@pytest.mark.parametrize(("opcode", "size"), [
    ("LDG.E.128", 16), ("LDG.E.128.CONSTANT", 16), ("LDG.E.64", 8), ("LDG.E", 4), ("LDG.E.U16", 2),
    ("LDG.E.S8", 1), ("LDS.128", 0), ("STG.E.128", 0), ("FADD", 0),
])
def test_load_bytes_read_the_width_modifier(opcode, size):
    assert roofline.load_bytes(opcode) == size


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        roofline.variant_specs()
