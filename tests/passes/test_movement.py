"""fold_movements: data movement next to a row kernel -> an index map the kernel stores or reads through
(NOTE [Movement maps]). CPU backend (the generated C++ is the CUDA kernel's twin); the GPU run is in tests/gpu."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.runtime.cc import compiler_info
from fxopt.runtime.kernel import KERNELS, fused_op

pytestmark = pytest.mark.skipif(compiler_info() is None, reason="no C++ compiler")


class WindowBlock(nn.Module):
    """Swin's attention block around its windows: LayerNorm, roll, window partition, a Linear per window (the
    attention stands in), window reverse, roll back, residual add + LayerNorm."""

    def __init__(self, c=16, window=4, shift=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.proj = nn.Linear(c, c)
        self.window, self.shift = window, shift

    def forward(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        ws, s = self.window, self.shift
        y = self.norm1(x)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, c)
        y = self.proj(y)
        y = y.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y
        return self.norm2(x)


def _copies_left(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.target in ("contiguous", torch.roll, "roll")]


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("batch", [1, 2])
def test_window_partition_and_reverse_become_index_maps(shift, batch):
    torch.manual_seed(0)
    model = WindowBlock(shift=shift).eval()
    x = torch.randn(batch, 8, 8, 16)
    opt = fxopt.optimize(model, (x,), strict=True)
    rec = {r.name: r for r in opt.records}["fold_movements"]
    assert rec.changes.get("chains_folded") == 2, rec
    assert _copies_left(opt.graph_module) == []
    kernels = [KERNELS[n.args[0]] for n in opt.graph_module.graph.nodes if n.target is fused_op]
    scattered = [k for k in kernels if any(o.scatter is not None for o in k.program.outputs)]
    gathered = [k for k in kernels if any(i.gather is not None for i in k.program.inputs)]
    assert len(scattered) == 1 and len(gathered) == 1
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


class _Chain(nn.Module):
    """LayerNorm, then a random movement chain, then a Linear (a GEMM: the chain's copy cannot join it)."""

    def __init__(self, order, shifts, dims, c):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(c), nn.Linear(c, c)
        self.order, self.shifts, self.dims = order, shifts, dims

    def forward(self, x):
        y = self.norm(x)
        y = torch.roll(y, self.shifts, self.dims).permute(*self.order).contiguous()
        return self.lin(y.reshape(-1, y.shape[-1]))


@pytest.mark.parametrize("seed", range(6))
def test_random_roll_and_permute_chains_match_eager(seed):
    rng = random.Random(seed)
    shape = [rng.randint(1, 5) for _ in range(3)] + [8]
    order = list(range(3))
    rng.shuffle(order)
    order = (*order, 3)  # keep the channels last: the Linear reads them
    dims = tuple(rng.sample(range(3), 2))
    shifts = tuple(rng.randint(-4, 4) for _ in dims)
    model = _Chain(order, shifts, dims, 8).eval()
    x = torch.randn(*shape)
    opt = fxopt.optimize(model, (x,), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    # roll always copies, so every chain here is folded: the LayerNorm stores through the map
    assert {r.name: r for r in opt.records}["fold_movements"].changes == {"chains_folded": 1}
    assert _copies_left(opt.graph_module) == [], opt.graph_module.code


def test_views_alone_and_chains_that_drop_elements_stay():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            y = self.norm(x)
            views = y.view(4, 2, 8).permute(1, 0, 2)  # views: nothing to save
            half = y[:, ::2].contiguous()  # drops elements: not a permutation
            return views * 2, half + 1

    x = torch.randn(8, 8)
    opt = fxopt.optimize(M().eval(), (x,), strict=True)
    assert {r.name: r for r in opt.records}["fold_movements"].status == "unchanged"
    with torch.no_grad():
        for got, want in zip(opt(x), M()(x)):
            torch.testing.assert_close(got, want)


def _mapped_kernel_and_args():
    model = WindowBlock(shift=2).eval()
    x = torch.randn(1, 8, 8, 16)
    opt = fxopt.optimize(model, (x,), strict=True)
    node = next(n for n in opt.graph_module.graph.nodes if n.target is fused_op
                and any(i.mode == "map" for i in KERNELS[n.args[0]].program.inputs))
    args = [opt.graph_module.get_buffer(a.target) if a.op == "get_attr" and a.target.startswith("movement_map")
            else torch.randn(*a.meta["tensor_meta"].shape) for a in node.args[1]]
    maps = [k for k, i in enumerate(KERNELS[node.args[0]].program.inputs) if i.mode == "map"]
    return KERNELS[node.args[0]].program, args, maps[0]


def test_a_map_that_does_not_fit_the_rows_is_refused_before_launch():
    from fxopt.runtime.rowwise import RowwiseKernel

    program, args, k = _mapped_kernel_and_args()
    bad = args[k].clone()
    bad.view(-1)[0] = bad.numel() + 5  # addresses an element past the end
    with pytest.raises(ValueError, match="outside"):
        RowwiseKernel(program, torch.device("cpu"))([bad if i == k else a for i, a in enumerate(args)])
    with pytest.raises(ValueError, match="index map"):
        RowwiseKernel(program, torch.device("cpu"))(
            [args[k][..., :-1].contiguous() if i == k else a for i, a in enumerate(args)])


def test_a_map_changed_after_its_check_faults_instead_of_writing_out_of_bounds():
    """The plan (and its map check) is cached per input signature; an entry changed later is caught in the kernel
    (a trap, as a device-side assert), never a stray write. Run in its own process, which the trap ends."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from tests.passes.test_movement import _mapped_kernel_and_args
        from fxopt.runtime.rowwise import RowwiseKernel
        program, args, k = _mapped_kernel_and_args()
        kernel = RowwiseKernel(program, torch.device("cpu"))
        kernel(args)  # checked and planned
        args[k].view(-1)[0] = 1 << 30  # tampered with after the check
        kernel(args)
        print("RETURNED")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=__file__.rsplit("/tests/", 1)[0])
    assert "RETURNED" not in done.stdout and done.returncode != 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.returncode < 0 or "Illegal" in done.stderr or done.returncode in (132, 133, 134), done.stderr[-2000:]


def test_the_cuda_source_of_mapped_kernels_compiles_with_nvrtc():
    from fxopt.codegen import rowwise
    from fxopt.runtime import nvrtc

    ok, why = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(f"NVRTC not available: {why}")
    program, _, _ = _mapped_kernel_and_args()
    source = rowwise.cuda_source(program)
    assert "fx_map_index(" in source
    assert program.name.encode() in nvrtc.compile_cuda(source, arch="sm_90", name_hint=program.name)


def test_a_module_with_maps_round_trips_through_save_and_load(tmp_path):
    model, x = WindowBlock(shift=2).eval(), torch.randn(1, 8, 8, 16)
    opt = fxopt.optimize(model, (x,), strict=True)
    path = fxopt.save(opt, tmp_path / "windows")
    loaded = fxopt.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_chain_whose_source_is_written_in_place_keeps_its_copy():
    """The copy reads the source where it stands; through a map the kernel would read it after the write."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            src = x * 2
            moved = torch.roll(src.permute(1, 0, 2), 1, 0)  # a copy
            src.add_(1)  # after the copy, before the LayerNorm reads `moved`
            return self.norm(moved), src

    x = torch.randn(3, 4, 8)
    opt = fxopt.optimize(M().eval(), (x,), strict=True)  # strict: a fold that read the written source would raise
    records = {r.name: r for r in opt.records}
    assert records["fuse_reductions"].status == "applied" and records["fold_movements"].changes == {}
    with torch.no_grad():
        for got, want in zip(opt(x), M().eval()(x)):
            torch.testing.assert_close(got, want)
