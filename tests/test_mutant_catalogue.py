"""The mutant catalogue (tests/mutants/catalogue.py) still fits the tree.

Mutation testing itself (tests/mutants/run.py) takes tens of minutes and is
not run here; this only checks that every mutant still applies (its `find`
text occurs exactly once), is well formed, names tests that exist, and that
the catalogue covers every part of the code it is meant to.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_catalogue():
    spec = importlib.util.spec_from_file_location(
        "mutant_catalogue", ROOT / "tests" / "mutants" / "catalogue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS


MUTANTS = _load_catalogue()
KEYS = {"id", "file", "find", "replace", "breaks", "tests", "env", "equivalent"}

# Each part of the code the catalogue must reach: (file, id prefix).
REQUIRED = [
    ("kernels/rmsprop_math.h", "math_"),
    ("kernels/rmsprop_math.h", "variant_maximize_"),
    ("kernels/rmsprop_math.h", "variant_coupled_"),
    ("kernels/rmsprop_math.h", "variant_decoupled_"),
    ("kernels/rmsprop_math.h", "variant_eps_"),
    ("kernels/rmsprop_math.h", "variant_bias_correction_"),
    ("kernels/rmsprop_math.h", "variant_centered_"),
    ("kernels/rmsprop_math.h", "variant_mean_"),
    ("kernels/rmsprop_math.h", "variant_nesterov_"),
    ("kernels/rmsprop_math.h", "variant_momentum_"),
    ("kernels/rmsprop_math.h", "variant_lr_"),
    ("csrc/rmsprop.h", "coeff_"),
    ("csrc/rmsprop.h", "flags_"),
    ("csrc/rmsprop.h", "constants_"),
    ("csrc/rmsprop.h", "plain_"),
    ("csrc/cpu/plain_loops.h", "span_"),
    ("csrc/cpu/plain_loops.h", "flat_"),
    ("csrc/cpu/plain_loops.h", "f16c_"),
    ("csrc/cpu/plain_loops.h", "span_simd_"),
    ("csrc/cpu/plain_loops.h", "span_for_"),
    ("csrc/cpu/plain_loops.h", "strided_"),
    ("csrc/cpu/transpose.h", "tile_"),
    ("csrc/rmsprop_cpu.cpp", "bound_"),
    ("csrc/rmsprop_cpu_parallel.cpp", "threads_"),
    ("csrc/rmsprop_cpu_parallel.cpp", "split_parts_"),
    ("csrc/cpu/transpose.h", "avx2_transpose_"),
    ("csrc/cpu/strided.h", "strided_odometer_"),
    ("csrc/cpu/strided.h", "strided_output_"),
    ("csrc/cpu/variant_loops.h", "variant_span_"),
    ("csrc/cpu/variant_loops.h", "variant_flat_"),
    ("csrc/cpu/variant_loops.h", "variant_strided_"),
    ("csrc/cpu/parallel.h", "split_"),
    ("csrc/cpu/parallel.h", "pool_busy_"),
    ("csrc/cpu/parallel.h", "pool_"),
    ("csrc/rmsprop_cpu_parallel.cpp", "pool_"),
    ("csrc/cpu/half.h", "f16_"),
    ("csrc/cpu/half.h", "f32_to_f16_"),
    ("csrc/cpu/half.h", "f32_to_bf16_"),
    ("csrc/cpu/half.h", "bf16_to_f32_"),
    ("csrc/cpu/simd.h", "f16c_"),
    ("csrc/cpu/simd.h", "simd_bf16_"),
    ("csrc/cpu/simd.h", "simd_f16_avx512_"),
    ("csrc/cpu/simd.h", "simd_"),
    ("csrc/cpu/builds.h", "builds_"),
    ("csrc/cpu/isa.h", "isa_"),
    ("csrc/rmsprop_cpu.cpp", "transposed_"),
    ("csrc/rmsprop_cpu.cpp", "strided_like_param_"),
    ("csrc/rmsprop_cpu.cpp", "walk_"),
    ("csrc/rmsprop_cpu_variant.cpp", "dispatch_variant_"),
    ("csrc/rmsprop_cpu_variant.cpp", "dispatch_half_variant_"),
    ("csrc/cpu/jobs.h", "dispatch_variant_"),
    ("csrc/cpu/jobs.h", "jobs_"),
    ("csrc/rmsprop_cpu_plain.cpp", "strided_like_param_"),
    ("csrc/rmsprop_cpu_plain.cpp", "rounded_plain_"),
    ("csrc/rmsprop_cpu_quantized.cpp", "state8_"),
    ("csrc/rmsprop_cpu.cpp", "skip_"),
    ("csrc/rmsprop_cpu.cpp", "rounded_plain_"),
    ("csrc/rmsprop.cpp", "state_names_"),
    ("csrc/rmsprop.cpp", "split_inputs_"),
    ("csrc/optimizer_step.cpp", "step_"),
    ("python/mlx_fused_rmsprop/optimizer.py", "step_counter_"),
    ("csrc/roofline.cpp", "roofline_"),
    ("csrc/roofline.h", "roofline_"),
    ("csrc/rmsprop.cpp", "alloc_"),
    ("csrc/rmsprop.cpp", "donate_"),
    ("csrc/rmsprop.cpp", "donate_state_"),
    ("csrc/rmsprop.cpp", "release_"),
    ("csrc/rmsprop.cpp", "check_"),
    ("csrc/rmsprop.cpp", "check_state_"),
    ("csrc/rmsprop.cpp", "check_step_"),
    ("csrc/rmsprop.cpp", "bias_correction_"),
    ("csrc/rmsprop.cpp", "is_equivalent_"),
    ("csrc/rmsprop.cpp", "collapse_"),
    ("csrc/rmsprop.cpp", "needs64_"),
    ("csrc/rmsprop.cpp", "dispatch_"),
    ("csrc/rmsprop.cpp", "gpu_slots_"),
    ("csrc/rmsprop_grid.h", "grid_threads"),
    ("csrc/rmsprop_grid.h", "grid_height"),
    ("csrc/rmsprop_grid.h", "grid_variant_"),
    ("kernels/rmsprop.metal", "shader_chunk_"),
    ("kernels/rmsprop.metal", "shader_tail_"),
    ("kernels/rmsprop.metal", "shader_contiguous_no_padding"),
    ("kernels/rmsprop.metal", "shader_general_"),
    ("kernels/rmsprop.metal", "shader_index_widths"),
    ("kernels/rmsprop.metal", "shader_variant_"),
    ("csrc/rmsprop_metal.cpp", "metal_"),
    ("python/mlx_fused_rmsprop/optimizer.py", "opt_"),
    ("python/mlx_fused_rmsprop/_state.py", "opt_child_"),
    ("python/mlx_fused_rmsprop/_state.py", "opt_walk_"),
    ("python/mlx_fused_rmsprop/optimizer.py", "opt_setter_"),
    ("python/mlx_fused_rmsprop/_state.py", "opt_state_"),
    ("python/mlx_fused_rmsprop/_state.py", "opt_init_"),
    ("python/mlx_fused_rmsprop/_presets.py", "preset_torch_"),
    ("python/mlx_fused_rmsprop/_presets.py", "preset_optax_"),
    ("python/mlx_fused_rmsprop/_presets.py", "preset_keras_"),
    ("python/mlx_fused_rmsprop/ops.py", "ops_"),
    ("python/mlx_fused_rmsprop/optimizer.py", "frozen_"),
    ("python/mlx_fused_rmsprop/optimizer.py", "valid_"),
    ("python/mlx_fused_rmsprop/_options.py", "valid_"),
    ("python/mlx_fused_rmsprop/ops.py", "valid_"),
    ("csrc/rmsprop.cpp", "valid_"),
    ("python/mlx_fused_rmsprop/_sharding.py", "agree_digest_"),
    ("python/mlx_fused_rmsprop/_sharding.py", "agree_"),
    ("python/mlx_fused_rmsprop/_state.py", "nbytes_"),
    ("python/mlx_fused_rmsprop/_sharding.py", "shard_assemble_"),
    ("python/mlx_fused_rmsprop/__init__.py", "pin_"),
    ("cmake/mlx_pin.cmake", "pin_"),
    ("python/mlx_fused_rmsprop/verify.py", "verify_"),
    ("csrc/quant_map.cpp", "state8_map_"),
    ("csrc/cpu/chunks.h", "state8_"),
    ("csrc/cpu/quantized_loops.h", "state8_"),
    ("python/mlx_fused_rmsprop/_state.py", "state8_"),
    ("python/mlx_fused_rmsprop/_sharding.py", "state8_"),
    # The memory-lean code: rounding, guards, 8-bit state (issues 18-20).
    ("kernels/rmsprop_math.h", "math_sr_"),
    ("kernels/rmsprop_math.h", "math_kahan_"),
    ("kernels/rmsprop_math.h", "math_q8_"),
    ("kernels/rmsprop_math.h", "math_clip_"),
    ("csrc/rmsprop.h", "state8_quantizes_"),
    ("csrc/rmsprop.cpp", "leaf_"),
    ("csrc/rmsprop.cpp", "entry_"),
    ("csrc/rmsprop.cpp", "step_scalars_"),
    ("csrc/rmsprop.cpp", "donate_q8_"),
    ("csrc/cpu/plain_loops.h", "rounded_"),
    ("csrc/cpu/variant_loops.h", "variant_store_"),
    ("csrc/cpu/chunks.h", "chunk_"),
    ("csrc/cpu/chunks.h", "state8_dequantize_"),
    ("csrc/cpu/chunks.h", "state8_codes_"),
    ("csrc/cpu/chunks.h", "state8_max_"),
    ("csrc/cpu/quantized_loops.h", "state8_general_"),
    ("csrc/cpu/quantized_loops.h", "state8_flat_"),
    ("csrc/cpu/quantized_loops.h", "state8_prefetch_"),
    ("csrc/cpu/quant_rank.h", "rank_table_"),
    ("csrc/quantize_state.cpp", "convert_"),
    ("csrc/grad_norm.cpp", "norm_"),
    ("csrc/optimizer_step.cpp", "norm_"),
    ("python/mlx_fused_rmsprop/_options.py", "opt_"),
    ("python/mlx_fused_rmsprop/_options.py", "options_"),
    ("python/mlx_fused_rmsprop/_presets.py", "valid_"),
    ("python/mlx_fused_rmsprop/_guards.py", "guards_"),
    ("python/mlx_fused_rmsprop/_state.py", "convert_"),
    ("python/mlx_fused_rmsprop/_state.py", "full_precision_"),
    ("python/mlx_fused_rmsprop/_state.py", "valid_"),
    ("python/mlx_fused_rmsprop/_state.py", "frozen_"),
    ("python/mlx_fused_rmsprop/_sharding.py", "shard_"),
    ("python/mlx_fused_rmsprop/_sharding.py", "valid_"),
    ("python/mlx_fused_rmsprop/_sharding.py", "frozen_"),
]


def test_ids_are_unique_and_there_are_enough():
    ids = [m["id"] for m in MUTANTS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    behaviour_changing = [m for m in MUTANTS if "equivalent" not in m]
    assert len(behaviour_changing) >= 150
    assert all(re.fullmatch(r"[a-z0-9_]+", i) for i in ids)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m["id"])
def test_mutant_is_well_formed_and_applies(mutant):
    assert set(mutant) <= KEYS, set(mutant) - KEYS
    assert mutant["breaks"].strip() and mutant["tests"]
    assert mutant["find"] and mutant["replace"] != mutant["find"]
    if "equivalent" in mutant:
        assert mutant["equivalent"].strip()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in mutant.get("env", {}).items())
    path = ROOT / mutant["file"]
    assert path.is_file(), mutant["file"]
    count = path.read_text().count(mutant["find"])
    assert count == 1, f"{mutant['id']}: 'find' occurs {count} times in {mutant['file']}"


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m["id"])
def test_named_tests_exist(mutant):
    args = mutant["tests"]
    paths = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-k")]
    assert paths, "name at least one test file or node id"
    for arg in paths:
        file, _, node = arg.partition("::")
        assert (ROOT / file).is_file(), arg
        if node:
            name = node.split("::")[-1].split("[")[0]
            assert re.search(rf"def {re.escape(name)}\(", (ROOT / file).read_text()), arg


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m["id"])
def test_a_k_expression_does_not_deselect_named_tests(mutant):
    """pytest applies -k to every test it collects: a selecting -k beside
    several named tests would silently drop the ones it does not match (only
    an exclusion, -k "not ...", may go with several)."""
    args = mutant["tests"]
    if "-k" not in args:
        return
    expr = args[args.index("-k") + 1]
    named = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] != "-k"]
    assert expr.startswith("not ") or len(named) == 1, (expr, named)


@pytest.mark.parametrize("file,prefix", REQUIRED)
def test_every_part_of_the_code_has_mutants(file, prefix):
    assert any(m["file"] == file and m["id"].startswith(prefix) for m in MUTANTS), (file, prefix)


def test_the_catalogue_modules_are_not_collected_as_tests():
    names = [p.name for p in (ROOT / "tests" / "mutants").glob("*.py")]
    assert names and not [n for n in names if n.startswith("test_") or n.endswith("_test.py")]
