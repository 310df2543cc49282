"""DiT and ADM U-Net: call signature, patch and full inputs, null class, global positions, registry."""

import pytest
import torch

from latent_patch import config
from latent_patch.edm import Precond, edm_loss
from latent_patch.models import PRESETS, DiT, ModelConfig, build_model, count_params, resolve
from latent_patch.patches import coord_grid, crop, random_crops

TINY = {"dit": "DiT-T/2", "unet": "adm-tiny"}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module", params=["dit", "unet"])
def tiny(request):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset=TINY[request.param], num_classes=10))


def _perturb(net: torch.nn.Module) -> None:
    """Move zero-initialised layers off zero so outputs and gradients are informative."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))


@pytest.mark.parametrize("size", [16, 32])
def test_forward_backward_on_patches_and_full(tiny, size):
    x = torch.randn(2, 6, size, size)
    out = tiny(x, torch.tensor([-1.0, 0.5]), torch.tensor([3, 10]))  # 10 = null class
    assert out.shape == (2, 4, size, size) and torch.isfinite(out).all()
    tiny.zero_grad()
    out.square().mean().add(out.sum()).backward()
    grads = [p.grad for p in tiny.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_null_class_rows():
    dit = build_model(ModelConfig(preset="DiT-T/2", num_classes=10))
    unet = build_model(ModelConfig(preset="adm-tiny", num_classes=10))
    assert dit.y_embedder.num_embeddings == 11 and unet.class_embedding.num_embeddings == 11


def test_labels_and_time_change_the_output():
    torch.manual_seed(0)
    for preset in TINY.values():
        net = build_model(ModelConfig(preset=preset, num_classes=10)).eval()
        _perturb(net)
        x = torch.randn(1, 6, 16, 16)
        base = net(x, torch.tensor([0.1]), torch.tensor([1]))
        assert not torch.allclose(base, net(x, torch.tensor([0.1]), torch.tensor([10])))
        assert not torch.allclose(base, net(x, torch.tensor([0.9]), torch.tensor([1])))


def test_dit_starts_at_zero_output():
    net = build_model(ModelConfig(preset="DiT-T/2", num_classes=10))
    assert net(torch.randn(2, 6, 8, 8), torch.zeros(2), torch.tensor([0, 1])).abs().max() == 0


def test_dit_patch_position_embeddings_equal_the_full_grid_slice():
    net = build_model(ModelConfig(preset="DiT-T/2", latent_size=32, num_classes=10))
    D, p, s = 64, 2, 16
    full = net.pos_embed(coord_grid(32)[None]).view(16, 16, D)
    offsets = torch.tensor([[0, 0], [4, 10], [16, 16], [2, 14]])  # token-aligned (multiples of p)
    _, coords = crop(torch.zeros(4, 1, 32, 32), offsets, s)
    patch = net.pos_embed(coords).view(4, s // p, s // p, D)
    for b, (oy, ox) in enumerate((offsets // p).tolist()):
        torch.testing.assert_close(patch[b], full[oy : oy + s // p, ox : ox + s // p], atol=1e-5, rtol=0)
    # The full grid is DiT's integer token grid (shifted by a quarter token): neighbours are resolvable.
    j = torch.arange(16, dtype=torch.float64) + 0.25
    omega = 1.0 / 10000 ** (torch.arange(16, dtype=torch.float64) / 16)
    x_part = torch.cat([torch.sin(j[:, None] * omega), torch.cos(j[:, None] * omega)], dim=1)
    torch.testing.assert_close(full[3, :, : D // 2], x_part.float(), atol=1e-5, rtol=0)
    assert (full[:, 1:] - full[:, :-1]).norm(dim=-1).min() > 0.5


def test_dit_reads_positions_from_the_coordinate_channels():
    torch.manual_seed(0)
    net = build_model(ModelConfig(preset="DiT-T/2", num_classes=10)).eval()
    _perturb(net)
    x = torch.randn(1, 6, 16, 16)
    moved = x.clone()
    moved[:, 4:] = coord_grid(32)[:, 16:, 16:]  # same content, other place in the latent
    t, y = torch.tensor([0.0]), torch.tensor([1])
    assert not torch.allclose(net(x, t, y), net(moved, t, y))


def _checkpointed_blocks(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The blocks checkpointing wraps: DiT's transformer blocks; the U-Net's residual blocks of
    its down and up paths (diffusers checkpoints those; attention and resampling run plainly)."""
    import re

    if isinstance(net, DiT):
        return {f"blocks.{i}": b for i, b in enumerate(net.blocks)}
    return {n: m for n, m in net.named_modules() if re.fullmatch(r"(down|up)_blocks\.\d+\.resnets\.\d+", n)}


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_grad_checkpointing_gives_the_same_gradients(arch):
    """Same gradients with and without checkpointing, and checkpointing really used: every
    checkpointed block runs twice per forward + backward (once more to recompute its
    activations), once without. Counted by forward pre-hooks (a recomputation stops early,
    so a hook after the forward would not see it)."""
    side = {"dit": 8, "unet": 16}[arch]
    torch.manual_seed(0)
    plain = build_model(ModelConfig(preset=TINY[arch], num_classes=10, dropout=0.0))
    _perturb(plain)
    ckpt = build_model(ModelConfig(preset=TINY[arch], num_classes=10, dropout=0.0, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 6, side, side), torch.zeros(2), torch.tensor([0, 1])
    runs = {}
    for name, net in (("plain", plain), ("ckpt", ckpt)):
        blocks = _checkpointed_blocks(net)
        assert blocks
        calls = dict.fromkeys(blocks, 0)
        handles = [b.register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1))
                   for n, b in blocks.items()]
        net(x, t, y).square().sum().backward()
        for h in handles:
            h.remove()
        runs[name] = calls
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert set(runs["plain"].values()) == {1}
    assert set(runs["ckpt"].values()) == {2}, runs["ckpt"]  # every block recomputed once in backward


def test_edm_loss_trains_a_tiny_dit_on_patches():
    net = build_model(ModelConfig(preset="DiT-T/2", num_classes=10))
    y = torch.randn(4, 4, 16, 16)
    patches, coords = random_crops(y, 8, torch.Generator().manual_seed(0))
    loss = edm_loss(Precond(net), patches, coords, torch.tensor([0, 1, 2, 3]), num_classes=10)
    loss.mean().backward()
    assert loss.shape == (4,) and net.final_layer.linear.weight.grad.abs().sum() > 0


def test_presets_and_paper_sizes():
    paper = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    for size, (hidden, depth, heads) in paper.items():
        for p in (2, 4, 8):
            params = PRESETS[f"DiT-{size}/{p}"].params
            got = (params["hidden_size"], params["depth"], params["num_heads"], params["patch_size"])
            assert got == (hidden, depth, heads, p)
    with torch.device("meta"):
        xl = build_model(ModelConfig(preset="DiT-XL/2"))
        adm = build_model(ModelConfig(preset="adm-imagenet256"))
    assert 670e6 < count_params(xl) < 680e6  # DiT-XL/2 is 675 M in the paper
    assert isinstance(xl, DiT)
    c = adm.config
    assert (c.in_channels, c.out_channels, c.layers_per_block) == (6, 4, 3)
    assert tuple(c.block_out_channels) == (192, 384, 576, 768)
    assert (c.attention_head_dim, c.dropout, c.num_class_embeds) == (64, 0.1, 1001)
    assert c.resnet_time_scale_shift == "scale_shift" and c.downsample_type == "resnet"
    assert list(c.down_block_types) == ["AttnDownBlock2D"] * 3 + ["ResnetDownsampleBlock2D"]  # attention at 32/16/8
    assert 270e6 < count_params(adm) < 290e6


def test_overrides_and_errors():
    arch, params = resolve(ModelConfig(preset="DiT-S/2", depth=4, hidden=128, heads=4, dropout=0.1))
    assert arch == "dit"
    assert (params["depth"], params["hidden_size"], params["num_heads"], params["dropout"]) == (4, 128, 4, 0.1)
    arch, params = resolve(ModelConfig(preset="adm-tiny", channel_mult=[1, 2, 2]))
    assert arch == "unet" and params["channel_mult"] == [1, 2, 2]
    with pytest.raises(ValueError, match="DiT-Q/2"):
        resolve(ModelConfig(preset="DiT-Q/2"))
    with pytest.raises(ValueError, match="arch"):
        resolve(ModelConfig(preset="adm-tiny", arch="dit"))
    with pytest.raises(ValueError, match="depth"):
        resolve(ModelConfig(preset="adm-tiny", depth=3))
    cfg = config.load(ModelConfig, overrides=["preset=adm-imagenet256", "arch=unet", "grad_checkpointing=true"])
    assert resolve(cfg)[0] == "unet" and cfg.grad_checkpointing


# --------------------------------------------------------------------------- token routing (TREAD)

def _routed_dit(**route):
    torch.manual_seed(0)
    net = build_model(ModelConfig(preset="DiT-T/2", num_classes=10, latent_size=8, depth=4, **route))
    _perturb(net)
    return net


def test_routing_matches_a_token_by_token_reference():
    """Kept tokens go through blocks start..end, the others rejoin with their state from before
    block start; checked against a plain per-sample loop over the documented rule."""
    from latent_patch.models.dit import draw_route, routed_keep

    net = _routed_dit(route_ratio=0.5, route_start=1, route_end=2)
    x, t, y = torch.randn(3, 6, 8, 8), torch.randn(3), torch.tensor([0, 4, 9])
    route = draw_route(3, 16, torch.Generator().manual_seed(5))
    assert all(sorted(r.tolist()) == list(range(16)) for r in route)  # a permutation per sample
    out = net(x, t, y, route=route)
    tokens = net.x_embedder(x).flatten(2).transpose(1, 2) + net.pos_embed(x[:, -2:])
    c = net.t_embedder(net.t_proj(t)) + net.y_embedder(y)
    keep = routed_keep(16, 0.5)
    rows = []
    for b in range(3):
        tok, cb = tokens[b:b + 1], c[b:b + 1]
        tok = net.blocks[0](tok, cb)
        kept = route[b, :keep]
        inner = tok[:, kept]
        for block in net.blocks[1:3]:
            inner = block(inner, cb)
        tok = tok.clone()
        tok[:, kept] = inner
        rows.append(net.blocks[3](tok, cb))
    ref = net.unpatchify(net.final_layer(torch.cat(rows), c), 4, 4)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, net(x, t, y))  # routing changes the output; no route: all tokens


def test_routed_blocks_see_the_kept_tokens_only_and_sampling_sees_all():
    from latent_patch.models.dit import draw_route

    net = _routed_dit(route_ratio=0.5, route_start=1, route_end=2)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for b in net.blocks]
    x, t, y = torch.randn(2, 6, 8, 8), torch.randn(2), torch.tensor([1, 2])
    net(x, t, y, route=draw_route(2, 16))
    assert seen == [16, 8, 8, 16]
    seen.clear()
    net(x, t, y)  # the sampler passes no route
    assert seen == [16, 16, 16, 16]
    for h in hooks:
        h.remove()


def test_routing_config_is_checked():
    with pytest.raises(ValueError, match=r"route_ratio=0.5 needs 0 <= model.route_start <= model.route_end < depth 4"):
        build_model(ModelConfig(preset="DiT-T/2", depth=4, route_ratio=0.5))
    with pytest.raises(ValueError, match=r"route_ratio=1.0 must lie in \[0, 1\)"):
        build_model(ModelConfig(preset="DiT-T/2", route_ratio=1.0, route_start=0, route_end=1))
    with pytest.raises(ValueError, match=r"model.route_ratio does not apply to preset 'adm-tiny'"):
        build_model(ModelConfig(preset="adm-tiny", route_ratio=0.5, route_start=0, route_end=1))


def test_routed_training_flops_are_counted():
    from latent_patch.models import forward_flops

    cfg = ModelConfig(preset="DiT-XL/2", route_ratio=0.5, route_start=2, route_end=25)
    full, routed = forward_flops(cfg), forward_flops(cfg, routed=True)
    assert round(full / 1e9, 1) == 237.2  # DiT-XL/2 at 32x32: DiT's 118.6 GMACs
    # 24 of 28 blocks on half the tokens (attention quadratic): a bit over 1 - 24/56 of the FLOPs
    assert 0.5 < routed / full < 1 - 24 / 56 + 0.02
    assert forward_flops(ModelConfig(preset="DiT-XL/2")) == full  # sampling (no route) costs the same


# --------------------------------------------------------------------------- precision of the residual stream

def _dit_reference(net: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The DiT forward written out with no casts: what an fp32 forward must equal bit for bit."""
    tokens = net.x_embedder(x).flatten(2).transpose(1, 2) + net.pos_embed(x[:, -2:])
    c = net.t_embedder(net.t_proj(t)) + net.y_embedder(y)
    for block in net.blocks:
        tokens = block(tokens, c)
    return net.unpatchify(net.final_layer(tokens, c), x.shape[2] // 2, x.shape[3] // 2)


@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_dit_residual_stream_stays_fp32_under_bf16_autocast(routed, checkpointed):
    """Issue 27: autocast runs the matmuls in bf16, but the tokens between blocks, the tokens routed
    around blocks and the condition c stay fp32 (the position embedding was cast to the patch
    embedding's bf16, and the whole stream with it). An fp32 forward is unchanged, bit for bit."""
    from latent_patch.models.dit import draw_route

    net = _routed_dit(route_ratio=0.5, route_start=1, route_end=3)  # the routed tokens rejoin at the final layer
    if checkpointed:
        net.enable_gradient_checkpointing()
    x, t, y = torch.randn(2, 6, 8, 8), torch.randn(2), torch.tensor([1, 10])
    route = draw_route(2, 16, torch.Generator().manual_seed(0)) if routed else None
    assert torch.equal(_dit_reference(net, x, t, y), net(x, t, y))  # fp32: bit-identical
    stream, matmuls = set(), set()
    hooks = [m.register_forward_hook(lambda m, args, out: stream.update(a.dtype for a in args))
             for m in [*net.blocks, net.final_layer]]
    hooks += [b.register_forward_hook(lambda m, args, out: stream.add(out.dtype)) for b in net.blocks]
    hooks.append(net.blocks[0].attn.qkv.register_forward_hook(lambda m, args, out: matmuls.add(out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, y, route=route)
    out.float().square().sum().backward()  # checkpointed: the blocks run again, under the saved autocast
    for h in hooks:
        h.remove()
    assert stream == {torch.float32} and matmuls == {torch.bfloat16}


def test_dit_small_block_updates_survive_in_the_residual_under_bf16():
    """Each block adds ~1e-3 of a residual of ~0.8: below bf16's resolution (2^-8 relative), so a
    bf16 stream rounded most updates away; the fp32 stream keeps them (matmul rounding only)."""
    net = _routed_dit()
    with torch.no_grad():
        for block in net.blocks:  # gates only: shift 0, scale 0, both gates 1e-3
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.view(6, -1).zero_()[[2, 5]] = 1e-3
    x, t, y = torch.randn(2, 6, 8, 8), torch.randn(2), torch.tensor([1, 2])

    def update(bf16: bool) -> torch.Tensor:
        """What the blocks added to the residual stream, all of them together."""
        seen = {}
        first = net.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(first=args[0].float()))
        last = net.blocks[-1].register_forward_hook(lambda m, args, out: seen.update(last=out.float()))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(x, t, y)
        first.remove()
        last.remove()
        assert seen["first"].abs().mean() > 0.5  # the premise: updates far below the residual's bf16 step
        return seen["last"] - seen["first"]

    exact, bf16 = update(False), update(True)
    assert 5e-4 < exact.abs().mean() < 2e-3
    assert (bf16 - exact).norm() / exact.norm() < 0.05
