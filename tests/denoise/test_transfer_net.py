import math

import torch
import torch.nn.functional as F

from hetero_ray.denoise.rdm import MIN_PROJECTIONS, directions, projections_for, rdm, sort_rows
from hetero_ray.denoise.transfer_net import TransferNet, TransferNetConfig, auto_sizes
from hetero_ray.spec import MethodSpec


def _reference(net: TransferNet, tt, ts, st, ss, valid):
    """method.md section 3 written out with explicit weight matrices."""
    cfg, enc = net.cfg, net.encoder

    def encode(x, sig):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        xh = (x - mu) / torch.sqrt(var + enc.input_norm.eps) * enc.input_norm.weight + enc.input_norm.bias
        xt = xh.reshape(*xh.shape[:-1], cfg.block_size, cfg.rank).transpose(-1, -2).reshape(xh.shape)
        h_row = F.gelu(xh @ enc.row.weight.T + enc.row.bias)
        h_col = F.gelu(xt @ enc.col.weight.T + enc.col.bias)
        l1, l2 = enc.gate_mlp[0], enc.gate_mlp[2]
        g = torch.clamp(torch.relu(torch.relu(sig @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias + cfg.mu_gate), 0, 1)
        e = (h_row + h_col) * g
        m2, v2 = e.mean(-1, keepdim=True), e.var(-1, unbiased=False, keepdim=True)
        return (e - m2) / torch.sqrt(v2 + enc.out_norm.eps) * enc.out_norm.weight + enc.out_norm.bias

    zt, zs = encode(tt, ts), encode(st, ss)
    pos = net.positions.weight
    qin, kin = zt + pos[: zt.shape[1]], zs + pos[: zs.shape[1]]
    att = net.attention
    h, dh = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    outs = []
    for m in range(tt.shape[0]):
        q = (qin[m] @ att.q.weight.T + att.q.bias).reshape(-1, h, dh)
        k = (kin[m] @ att.k.weight.T + att.k.bias).reshape(-1, h, dh)
        v = (kin[m] @ att.v.weight.T + att.v.bias).reshape(-1, h, dh)
        heads = []
        for j in range(h):
            s = q[:, j] @ k[:, j].T / math.sqrt(dh)
            s[:, ~valid[m]] = float("-inf")
            heads.append(torch.softmax(s, -1) @ v[:, j])
        ctx = torch.cat(heads, -1) @ att.out.weight.T + att.out.bias
        d0, d2 = net.decoder[0], net.decoder[2]
        outs.append(F.gelu(ctx @ d0.weight.T + d0.bias) @ d2.weight.T + d2.bias)
    return torch.stack(outs), zt, zs


def test_forward_matches_the_equations():
    torch.manual_seed(0)
    cfg = TransferNetConfig(block_size=8, rank=2, embed_dim=16, num_heads=4, max_positions=32, mu_gate=0.1)
    net = TransferNet(cfg)
    with torch.no_grad():  # give the zero-initialised last layer values so the check is not trivial
        net.decoder[2].weight.normal_()
        net.decoder[2].bias.normal_()
    tt, ts = torch.randn(3, 2, 16), torch.rand(3, 2, 2)
    st, ss = torch.randn(3, 5, 16), torch.rand(3, 5, 2)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = net(tt, ts, st, ss, valid)
    ref, zt, zs = _reference(net, tt, ts, st, ss, valid)
    torch.testing.assert_close(out["delta"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["z_target"], zt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["z_source"], zs, rtol=1e-5, atol=1e-5)
    assert torch.all(out["attention"][1, :, 3:] == 0)  # padding gets no attention


def test_zero_initialised_decoder_gives_zero_update():
    torch.manual_seed(1)
    cfg = TransferNetConfig(block_size=8, rank=2, embed_dim=16, num_heads=2, max_positions=8)
    net = TransferNet(cfg)
    assert sum(p.numel() for p in net.parameters()) == cfg.num_parameters()
    out = net(torch.randn(2, 2, 16), torch.rand(2, 2, 2), torch.randn(2, 3, 16), torch.rand(2, 3, 2),
              torch.ones(2, 3, dtype=torch.bool))
    assert torch.count_nonzero(out["delta"]) == 0


def test_paper_preset_parameter_count():
    """About 110M parameters per group at b=4096, r=8, d=1024 (3 b r d dominates): method.md."""
    cfg = TransferNetConfig.paper(rank=8)
    n = sum(p.numel() for p in TransferNet(cfg).parameters())
    assert n == cfg.num_parameters()
    assert abs(n - 110.5e6) / 110.5e6 < 0.02
    assert auto_sizes(4096, 4)["block_size"] == 4096 and auto_sizes(4096, 4)["embed_dim"] == 1024


def test_rdm_matches_direct_sliced_wasserstein():
    z = torch.randn(50, 8)
    got = rdm(z, 0.0, 1.0, 16, torch.Generator().manual_seed(3), kind="iid")
    g = torch.Generator().manual_seed(3)
    y = torch.relu(torch.randn(50, 8, generator=g))
    u = torch.randn(8, 16, generator=g)
    u = u / u.norm(dim=0)
    zs = torch.sort(torch.relu(z) @ u, 0).values
    ys = torch.sort(y @ u, 0).values
    torch.testing.assert_close(got, ((zs - ys) ** 2).mean())
    # orthogonal directions: the same distance along the directions `directions` draws, with the same gradient
    for rows, p in ((50, 6), (5, 20), (50, 20)):  # one block; past a block with few rows (rotated first); many
        z = torch.randn(rows, 8, dtype=torch.float64, requires_grad=True)
        got = rdm(z, 0.5, 2.0, p, torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        y = torch.relu(torch.randn(rows, 8, generator=g, dtype=torch.float64) * 2.0 + 0.5)
        u = directions(8, p, g, torch.float64)
        want = ((torch.sort(torch.relu(z) @ u, 0).values - torch.sort(y @ u, 0).values) ** 2).mean()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])
    # a sample of the target distribution itself scores far lower than a shifted one
    near = rdm(torch.randn(4000, 8), 0.0, 1.0, 64, torch.Generator().manual_seed(0))
    far = rdm(torch.randn(4000, 8) + 3, 0.0, 1.0, 64, torch.Generator().manual_seed(0))
    assert near < 0.05 * far


def test_rdm_sorts_contiguously_with_the_values_and_gradients_of_the_plain_form():
    def plain(z, g):  # the authors' layout: samples x projections, sorted along the samples
        zp = F.relu(z)
        yp = F.relu(torch.randn(z.shape, generator=g, dtype=z.dtype))
        u = torch.randn(z.shape[1], 256, generator=g, dtype=z.dtype)
        u = u / u.norm(dim=0, keepdim=True)
        return ((torch.sort(zp @ u, dim=0)[0] - torch.sort(yp @ u, dim=0)[0]) ** 2).mean()

    z = torch.randn(96, 16, dtype=torch.float64, requires_grad=True)
    a = plain(z, torch.Generator().manual_seed(3))
    b = rdm(z, num_projections=256, generator=torch.Generator().manual_seed(3), kind="iid")
    assert torch.allclose(a, b, rtol=1e-12)
    (ga,), (gb,) = torch.autograd.grad(a, z), torch.autograd.grad(b, z)
    assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-14) and ga.abs().sum() > 0


def test_sort_rows_gives_torch_sort_values_and_gradients_on_cpu():
    """RDM's CPU sort (numpy's order, then a gather) returns torch.sort's values bit for bit, ties included,
    and routes gradients as torch.sort does."""
    x = torch.randn(64, 300)
    x[:, :40] = 0.0  # ties, as ReLU makes
    x[3, 50:60] = 1.5
    x.requires_grad_(True)
    got, ref = sort_rows(x), torch.sort(x, dim=-1).values
    assert torch.equal(got, ref)
    assert torch.equal(sort_rows(x.detach()), ref.detach())
    w = torch.randn(64, 300)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    distinct = x.detach() != 0.0
    distinct[3, 50:60] = False
    assert torch.equal(g_got[distinct], g_ref[distinct])
    # a tied group receives the same total gradient either way
    assert torch.allclose(g_got[~distinct].sum(), g_ref[~distinct].sum())
    assert torch.equal(sort_rows(torch.tensor([[3, 1, 2]])), torch.tensor([[1, 2, 3]]))  # other dtypes: torch


def test_rdm_on_a_sample_of_rows_is_exact_at_or_below_the_cap_and_near_the_full_estimate_above_it():
    """max_samples bounds RDM's cost at many sources. At or below the cap nothing changes, bit for bit; above
    it, the subsampled estimate stays within 10% of the full one (averaged over 8 draws: it is an estimate,
    as the full one is) and its gradient points the same way."""
    torch.manual_seed(0)
    mix = torch.cat([torch.randn(12000, 16) * 0.5 + 1.0, torch.randn(8000, 16) * 2.0 - 0.5])  # not Gaussian
    small = mix[:500].clone().requires_grad_(True)
    assert torch.equal(rdm(small, num_projections=128, generator=torch.Generator().manual_seed(1)),
                       rdm(small, num_projections=128, generator=torch.Generator().manual_seed(1), max_samples=500))

    z = mix.clone().requires_grad_(True)
    full = [rdm(z, num_projections=256, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    part = [rdm(z, num_projections=256, generator=torch.Generator().manual_seed(s), max_samples=2048)
            for s in range(8)]
    full_mean, part_mean = torch.stack(full).mean(), torch.stack(part).mean()
    assert abs(part_mean - full_mean) / full_mean < 0.10, (part_mean.item(), full_mean.item())
    (g_full,) = torch.autograd.grad(full_mean, z)
    (g_part,) = torch.autograd.grad(part_mean, z)
    cos = F.cosine_similarity(g_full.flatten(), g_part.flatten(), dim=0)
    assert cos > 0.5, cos.item()
    # a far distribution still reads as far: the cap does not flatten the signal
    far = rdm(mix + 3, num_projections=256, generator=torch.Generator().manual_seed(0), max_samples=2048)
    assert far > 3 * full_mean


def test_rdm_sort_budget_uses_fewer_projections_and_keeps_the_estimate_unbiased():
    """The default way to bound RDM's cost: past rows x projections = budget, fewer projections (a Monte Carlo
    sample of directions, so the mean is unchanged), never fewer than the floor; exact below the budget. The
    default (2048 x 128, orthogonal directions) against the paper's form (2048 independent directions on
    every row), over 8 draws each."""
    budget = MethodSpec().rdm_sort_budget
    assert budget == 2048 * 128 and MethodSpec().rdm_directions == "orthogonal"
    assert projections_for(128, 2048, budget) == 2048  # the paper's value up to the budget
    assert projections_for(2816, 2048, budget) == budget // 2816 == 93
    assert projections_for(10**6, 2048, budget) == MIN_PROJECTIONS
    assert projections_for(10**6, 16, budget) == 16 and projections_for(10**6, 2048, None) == 2048

    torch.manual_seed(0)
    z = torch.cat([torch.randn(1700, 64) * 0.5 + 0.4, torch.randn(1116, 64) * 1.5 - 0.2]).requires_grad_(True)
    small = z[:100]
    assert torch.equal(rdm(small, generator=torch.Generator().manual_seed(1)),
                       rdm(small, generator=torch.Generator().manual_seed(1), sort_budget=2048 * 100))
    full = torch.stack([rdm(z, generator=torch.Generator().manual_seed(s), kind="iid") for s in range(8)]).mean()
    cut = torch.stack([rdm(z, generator=torch.Generator().manual_seed(s), sort_budget=budget)
                       for s in range(8)]).mean()
    assert abs(cut - full) / full < 0.05, (cut.item(), full.item())  # measured 1.1%
    (g_full,), (g_cut,) = torch.autograd.grad(full, z), torch.autograd.grad(cut, z)
    cos = F.cosine_similarity(g_full.flatten(), g_cut.flatten(), dim=0)
    assert cos > 0.9, cos.item()  # measured 0.980 (the earlier default, 372 iid directions: 0.984)
    # subsampling rows to the same cost instead is biased upwards on the same data
    rows = torch.stack([rdm(z, generator=torch.Generator().manual_seed(s), max_samples=128) for s in range(8)]).mean()
    assert rows > full * 1.15, (rows.item(), full.item())


def test_orthogonal_directions_are_orthonormal_blocks_and_lower_the_estimates_variance():
    """Orthogonal directions are unit vectors, orthonormal within each block of d, redrawn with the generator;
    each is uniform on the sphere, so the estimate's mean is the paper's, and its one-draw gradient is closer
    to the expected gradient than with as many independent directions, and as close as with 4x as many."""
    for p in (5, 16, 40):
        u = directions(16, p, torch.Generator().manual_seed(0), torch.float64)
        assert u.shape == (16, p)
        torch.testing.assert_close(u.norm(dim=0), torch.ones(p, dtype=torch.float64))
        for b in range(0, p, 16):
            blk = u[:, b:b + 16]
            torch.testing.assert_close(blk.T @ blk, torch.eye(blk.shape[1], dtype=torch.float64))
        assert torch.equal(u, directions(16, p, torch.Generator().manual_seed(0), torch.float64))
        assert not torch.allclose(u, directions(16, p, torch.Generator().manual_seed(1), torch.float64))
    # one direction, over 400 draws, is uniform on the sphere: mean 0, covariance I / 16 (without the sign fix
    # of R's diagonal, QR's first column leans one way); in the first block (a Haar draw) and past it (a
    # rotation of the fixed design)
    for p, col in ((5, 0), (40, 20)):
        u = torch.stack([directions(16, p, torch.Generator().manual_seed(s), torch.float64)[:, col]
                         for s in range(400)])
        assert u.mean(0).abs().max() < 0.05, (p, u.mean(0))  # each coordinate's sd is 1/4: 4 SE
        torch.testing.assert_close(u.T @ u / 400, torch.eye(16, dtype=torch.float64) / 16, atol=0.02, rtol=0)

    torch.manual_seed(0)
    z = torch.cat([torch.randn(700, 32) * 0.5 + 0.4, torch.randn(500, 32) * 1.5 - 0.2]).requires_grad_(True)

    def draw(seed, p, kind):
        loss = rdm(z, num_projections=p, generator=torch.Generator().manual_seed(seed), kind=kind)
        return loss.detach(), torch.autograd.grad(loss, z)[0].flatten()

    ref = [draw(100 + s, 256, "iid") for s in range(24)]  # the expected value and gradient, by the paper's form
    mean_ref, g_ref = torch.stack([v for v, _ in ref]).mean(), torch.stack([g for _, g in ref]).mean(0)

    def closeness(p, kind):
        got = [draw(s, p, kind) for s in range(8)]
        cos = torch.tensor([F.cosine_similarity(g, g_ref, dim=0) for _, g in got]).mean()
        return torch.stack([v for v, _ in got]).mean(), cos

    orth_mean, orth32 = closeness(32, "orthogonal")  # one block of d = 32
    _, iid32 = closeness(32, "iid")
    _, iid128 = closeness(128, "iid")
    assert abs(orth_mean / mean_ref - 1) < 0.05, (orth_mean, mean_ref)  # measured 2.2% (one-draw sd 6%)
    assert orth32 > iid32 + 0.1, (orth32, iid32)  # measured 0.867 vs 0.676
    assert orth32 > iid128 - 0.03, (orth32, iid128)  # measured 0.867 vs 0.873


def test_rdm_runs_in_half_precision_with_either_kind_of_directions():
    """Under cluster.dtype bf16 the nets' encodings are bf16: LAPACK has no half-precision QR, so orthogonal
    directions are factored in fp32 and cast; value and gradient keep the encodings' dtype."""
    for dtype in (torch.bfloat16, torch.float16):
        for kind in ("orthogonal", "iid"):
            for rows in (6, 300):  # past a block with few rows; budget-cut
                z = torch.randn(rows, 16, dtype=dtype, requires_grad=True)
                v = rdm(z, num_projections=64, generator=torch.Generator().manual_seed(0), sort_budget=300 * 8,
                        kind=kind)
                v.backward()
                assert v.dtype == dtype and z.grad.dtype == dtype and torch.isfinite(v) and v > 0
