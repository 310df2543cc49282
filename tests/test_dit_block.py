"""The 2025 DiT block (issue 29): RoPE of absolute latent cells, SwiGLU, RMSNorm, QK-norm, each an
option whose default is the 2022 block, which old checkpoints keep bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latent_patch import config
from latent_patch.models import PRESETS, DiT, ModelConfig, build_model, count_params, forward_flops, resolve
from latent_patch.models.dit import draw_route, routed_keep, swiglu_hidden
from latent_patch.patches import coord_grid, crop, random_offsets

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

GOLDEN = Path(__file__).parent / "data" / "dit2022_golden.safetensors"
NEW = {"pos": "rope", "mlp": "swiglu", "norm": "rms", "qk_norm": True}


def _perturb(net: torch.nn.Module) -> None:
    """Move zero-initialised layers off zero so outputs and gradients are informative."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))


def _net(preset: str = "DiT-T/2-2025", **over) -> DiT:
    torch.manual_seed(0)
    net = build_model(ModelConfig(preset=preset, num_classes=10, **{"latent_size": 16, **over}))
    _perturb(net)
    return net


def test_the_default_block_reproduces_outputs_saved_by_the_2022_block():
    """tests/data/dit2022_golden.safetensors: weights, inputs and outputs (plain and routed) written
    by dit.py before the block options existed (55e5557). Within float32 rounding (another CPU may
    round its sums differently); on the machine that wrote it the outputs were bit-identical."""
    from safetensors.torch import load_file

    golden = load_file(GOLDEN)
    net = DiT(hidden_size=32, depth=2, num_heads=2, num_classes=10, latent_size=16,
              route_ratio=0.5, route_start=0, route_end=0)
    net.load_state_dict({k[len("weights."):]: v for k, v in golden.items() if k.startswith("weights.")})
    x, t, y, route = (golden[f"in.{k}"] for k in ("x", "t", "y", "route"))
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), golden["out.plain"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(net(x, t, y, route=route), golden["out.routed"], atol=1e-6, rtol=1e-5)


def test_a_config_saved_before_the_options_builds_the_2022_block():
    """An exported model's config.json and a checkpoint's model config from before issue 29 name
    none of the new keys: they build today's defaults and load their weights strictly."""
    old = {k: v for k, v in _net("DiT-T/2").config.items() if k not in ("pos", "mlp", "norm", "qk_norm",
                                                                         "coord_channels")}
    net = DiT.from_config(old)
    assert (net.config.pos, net.config.mlp, net.config.norm, net.config.qk_norm, net.config.coord_channels) == \
        ("sincos", "gelu", "layer", False, True)
    net.load_state_dict(_net("DiT-T/2").state_dict(), strict=True)
    assert resolve(ModelConfig(preset="DiT-T/2"))[1].keys().isdisjoint(NEW)


def test_presets_name_the_new_block_and_overrides_reach_each_option():
    for size in ("T", "S", "B", "L", "XL"):
        for p in (2, 4, 8):
            old, new = PRESETS[f"DiT-{size}/{p}"].params, PRESETS[f"DiT-{size}/{p}-2025"].params
            assert new == {**old, **NEW}
    cfg = config.load(ModelConfig, overrides=["preset=DiT-T/2", "pos=rope", "mlp=swiglu", "norm=rms",
                                              "qk_norm=true", "coord_channels=false"])
    params = resolve(cfg)[1]
    assert {k: params[k] for k in (*NEW, "coord_channels")} == {**NEW, "coord_channels": False}
    net = build_model(cfg)
    assert net.x_embedder.in_channels == 4  # the coordinates set positions only
    assert type(net.blocks[0].norm1).__name__ == "RMSNorm" and type(net.blocks[0].attn.q_norm).__name__ == "RMSNorm"
    assert type(net.final_layer.norm).__name__ == "RMSNorm"


@pytest.mark.parametrize("affine", [False, True])
def test_the_cpu_rms_norm_matches_torch_in_value_and_gradient(affine):
    """The hand-written backward (dit._RMSNormFunction) against torch's composite rms_norm, on a
    strided view like the q of the qkv projection, with a weight off one so its gradient counts."""
    from latent_patch.models.dit import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
    base = torch.randn(3, 5, 3, 2, 16, requires_grad=True)
    x = base[:, :, 0]  # (3, 5, 2, 16), not contiguous
    grad = torch.randn(3, 5, 2, 16)
    ours = torch.autograd.grad(norm(x), [base, *norm.parameters()], grad)
    y = torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-6)
    theirs = torch.autograd.grad(y, [base, *norm.parameters()], grad)
    torch.testing.assert_close(norm(x), y, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("norm", ["rms", "layer", "none"])
def test_the_q_k_norm_and_rotation_match_the_pairwise_formula_in_value_and_gradient(norm):
    """Attention.norm_rotate (for RMSNorm on the CPU the one-function path with its own backward,
    otherwise norm then ``rotate``) against torch's norms and the rotation written pair by pair."""
    from latent_patch.models.dit import Attention, RMSNorm, token_norm

    torch.manual_seed(0)
    layer = torch.nn.Identity() if norm == "none" else token_norm(norm, 8, affine=True)
    if norm == "rms":
        assert type(layer) is RMSNorm
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    base = torch.randn(2, 5, 3, 2, 8, requires_grad=True)
    x = base[:, :, 0]  # (B, T, H, d) as the qkv projection gives it, not contiguous
    angle = 3 * torch.randn(2, 5, 1, 4)
    rope = (torch.cat([angle.cos(), angle.cos()], -1), torch.cat([-angle.sin(), angle.sin()], -1))
    grad = torch.randn(2, 5, 2, 8)
    ours = Attention.norm_rotate(x, layer, rope)
    ours_grads = torch.autograd.grad(ours, [base, *layer.parameters()], grad)
    if norm == "rms":
        normed = torch.nn.functional.rms_norm(x, (8,), layer.weight, 1e-6)
    elif norm == "layer":
        normed = torch.nn.functional.layer_norm(x, (8,), layer.weight, layer.bias, 1e-6)
    else:
        normed = x
    a, b = normed.chunk(2, -1)
    cos, sin = angle.cos(), angle.sin()
    ref = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    ref_grads = torch.autograd.grad(ref, [base, *layer.parameters()], grad)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("over", "match"), [
    ({"pos": "alibi"}, r"model.pos='alibi' is unknown \(known: sincos, rope\)"),
    ({"mlp": "geglu"}, r"model.mlp='geglu' is unknown"),
    ({"norm": "batch"}, r"model.norm='batch' is unknown"),
    ({"pos": "rope", "hidden": 36, "heads": 2}, r"model.pos=rope needs a head dim divisible by 4.*= 18"),
])
def test_block_options_that_cannot_work_are_refused_naming_the_key(over, match):
    with pytest.raises(ValueError, match=match):
        build_model(ModelConfig(preset="DiT-T/2", **over))


def test_block_options_do_not_apply_to_the_unet():
    with pytest.raises(ValueError, match=r"model.pos does not apply to preset 'adm-tiny'"):
        build_model(ModelConfig(preset="adm-tiny", pos="rope"))


def test_swiglu_keeps_the_gelu_mlps_parameters():
    assert swiglu_hidden(1152, 4.0) == 3072 and swiglu_hidden(768, 4.0) == 2048 and swiglu_hidden(64, 4.0) == 168
    for size in ("T", "S", "B", "XL"):
        with torch.device("meta"):
            gelu = build_model(ModelConfig(preset=f"DiT-{size}/2"))
            swiglu = build_model(ModelConfig(preset=f"DiT-{size}/2", mlp="swiglu"))
        a, b = count_params(gelu.blocks[0].mlp), count_params(swiglu.blocks[0].mlp)
        assert abs(b / a - 1) < 0.015, (size, a, b)
        assert swiglu.blocks[0].mlp.fc1.out_features % 16 == 0  # two halves, each a multiple of 8


def _matmul_flops(cfg: ModelConfig, side: int) -> float:
    """Forward FLOPs written out by hand (2 per multiply-add; norms, RoPE's rotation and
    activations are elementwise and counted for no block, as torch's counter does)."""
    net = build_model(cfg)
    D, depth, p, T = net.config.hidden_size, net.config.depth, net.patch_size, (side // net.patch_size) ** 2
    mlp = 3 * D * swiglu_hidden(D, 4.0) if net.config.mlp == "swiglu" else 2 * D * 4 * D
    block = T * (4 * D * D + mlp) + 2 * T * T * D + 6 * D * D  # qkv+proj, MLP, q@k and attn@v, adaLN
    embed = T * net.x_embedder.in_channels * p * p * D + (net.config.freq_dim * D + D * D)  # patches, time MLP
    final = T * D * p * p * net.out_channels + 2 * D * D
    return 2.0 * (depth * block + embed + final)


@pytest.mark.parametrize("over", [{}, {"mlp": "swiglu"}, {"pos": "rope"}, {"norm": "rms", "qk_norm": True},
                                  NEW, {**NEW, "coord_channels": False}])
def test_the_flop_counter_counts_every_option(over):
    cfg = ModelConfig(preset="DiT-T/2", num_classes=10, latent_size=16, **over)
    for side in (8, 16):
        assert forward_flops(cfg, side) == _matmul_flops(cfg, side)


# --------------------------------------------------------------------------- RoPE on absolute latent cells

def test_rope_angles_of_a_crop_equal_the_full_latents_at_every_drawable_offset():
    """For every offset the trainer can draw for a DiT, each token of a crop turns its queries and
    keys by exactly the angles of the full latent's token at the same cells: row angles from its
    row, column angles from its column, in the full latent's token units."""
    R, s = 16, 8
    net = _net(latent_size=R)
    p = net.patch_size
    full_cos, full_sin = (a.view(R // p, R // p, -1) for a in net.rope(coord_grid(R)[None]))
    drawn = {tuple(o) for o in random_offsets(4000, R, s, torch.Generator().manual_seed(1), step=p).tolist()}
    assert drawn == {(r, c) for r in range(0, R - s + 1, p) for c in range(0, R - s + 1, p)}
    for r, c in sorted(drawn):
        _, coords = crop(torch.zeros(1, 4, R, R), torch.tensor([[r, c]]), s)
        cos, sin = (a.view(s // p, s // p, -1) for a in net.rope(coords))
        window = (slice(r // p, (r + s) // p), slice(c // p, (c + s) // p))
        torch.testing.assert_close(cos, full_cos[window], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, full_sin[window], atol=1e-6, rtol=0)
    # the angles are (row, column) x frequencies, a quarter token past the integer grid (as sin-cos)
    j = torch.arange(R // p).float() + 0.25
    freq = net.pos_freq.expand(R // p, R // p, -1)
    angle = torch.cat([j[:, None, None] * freq, j[None, :, None] * freq], dim=-1)
    torch.testing.assert_close(full_cos, torch.cat([angle.cos(), angle.cos()], -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(full_sin, torch.cat([-angle.sin(), angle.sin()], -1), atol=1e-5, rtol=0)


def _shifted(x: torch.Tensor, rows: int, cols: int, R: int = 32) -> torch.Tensor:
    """The same content with the coordinates of another place in an R x R latent."""
    moved = x.clone()
    moved[:, -2:] = coord_grid(R)[:, rows:rows + x.shape[2], cols:cols + x.shape[3]]
    return moved


def test_rope_attention_sees_relative_places_and_coordinate_channels_absolute_ones():
    """Without coordinate channels a RoPE DiT sees only where tokens lie relative to each other:
    the same content anywhere on the token grid gives the same output (up to float rounding), but
    swapping rows and columns does not. With the channels (the default) the place matters."""
    x, t, y = torch.randn(1, 6, 8, 8), torch.tensor([0.3]), torch.tensor([2])
    x = _shifted(x, 0, 0)
    relative = _net(latent_size=32, coord_channels=False).eval()
    with torch.no_grad():
        base = relative(x, t, y)
        torch.testing.assert_close(relative(_shifted(x, 6, 10), t, y), base, atol=1e-5, rtol=1e-4)
        swapped = x.clone()
        swapped[:, -2:] = x[:, -2:].flip(1)  # (x, y) -> (y, x): the grid transposed
        assert (relative(swapped, t, y) - base).abs().max() > 1e-3
        absolute = _net(latent_size=32).eval()
        assert (absolute(_shifted(x, 6, 10), t, y) - absolute(x, t, y)).abs().max() > 1e-3


def test_routed_tokens_keep_their_rope_positions():
    """The token-by-token reference of the routing rule (test_models), with RoPE: each kept token
    goes through the routed blocks with its own angles, and the rejoined stream with everyone's."""
    net = _net(latent_size=8, depth=4, route_ratio=0.5, route_start=1, route_end=2)
    x, t, y = torch.randn(3, 6, 8, 8), torch.randn(3), torch.tensor([0, 4, 9])
    x[:, -2:] = coord_grid(8)
    route = draw_route(3, 16, torch.Generator().manual_seed(5))
    out = net(x, t, y, route=route)
    tokens = net.x_embedder(x).flatten(2).transpose(1, 2)
    cos, sin = net.rope(x[:, -2:])
    c = net.t_embedder(net.t_proj(t)) + net.y_embedder(y)
    keep, rows = routed_keep(16, 0.5), []
    for b in range(3):
        tok, cb, rope = tokens[b:b + 1], c[b:b + 1], (cos[b:b + 1], sin[b:b + 1])
        tok = net.blocks[0](tok, cb, rope)
        kept = route[b, :keep]
        inner = tok[:, kept]
        for block in net.blocks[1:3]:
            inner = block(inner, cb, (rope[0][:, kept], rope[1][:, kept]))
        tok = tok.clone()
        tok[:, kept] = inner
        rows.append(net.blocks[3](tok, cb, rope))
    ref = net.unpatchify(net.final_layer(torch.cat(rows), c), 4, 4)
    torch.testing.assert_close(out, ref)


def test_alignment_sees_the_routed_tokens_of_the_new_block():
    """Representation alignment reads the tokens after block ``align_block``: with RoPE and routing,
    those the routed blocks saw, and which they are."""
    net = _net(latent_size=8, depth=4, route_ratio=0.5, route_start=0, route_end=2)
    x, t, y = torch.randn(2, 6, 8, 8), torch.randn(2), torch.tensor([1, 2])
    route = draw_route(2, 16, torch.Generator().manual_seed(0))
    seen = {}
    hook = net.blocks[1].register_forward_hook(lambda m, args, out: seen.update(out=out))
    out, tokens, kept = net(x, t, y, route=route, align_block=2)
    hook.remove()
    assert torch.equal(tokens, seen["out"]) and tokens.shape[1] == 8 and torch.equal(kept, route[:, :8])
    torch.testing.assert_close(out, net(x, t, y, route=route))


# --------------------------------------------------------------------------- training machinery

def test_grad_checkpointing_gives_the_same_gradients_with_the_new_block():
    plain, ckpt = _net(latent_size=8), _net(latent_size=8, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 6, 8, 8), torch.zeros(2), torch.tensor([0, 1])
    calls = []
    hook = ckpt.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    for net in (plain, ckpt):
        net(x, t, y, route=None).square().sum().backward()
    hook.remove()
    assert len(calls) == 2  # recomputed in backward: checkpointing really ran
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("routed", [False, True])
def test_new_block_under_bf16_autocast_keeps_an_fp32_stream_and_fp32_angles(routed):
    net = _net(latent_size=8, depth=4, route_ratio=0.5, route_start=1, route_end=3)
    x, t, y = torch.randn(2, 6, 8, 8), torch.randn(2), torch.tensor([1, 10])
    x[:, -2:] = coord_grid(8)
    route = draw_route(2, 16, torch.Generator().manual_seed(0)) if routed else None
    stream, rotated = set(), set()
    hooks = [b.register_forward_hook(lambda m, args, out: stream.update({args[0].dtype, out.dtype}))
             for b in net.blocks]
    hooks.append(net.blocks[0].attn.q_norm.register_forward_hook(lambda m, args, out: rotated.add(out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, y, route=route)
        cos, _ = net.rope(x[:, -2:])
    for h in hooks:
        h.remove()
    assert stream == {torch.float32} and cos.dtype == torch.float32
    torch.testing.assert_close(out.float(), net(x, t, y, route=route), atol=0.05, rtol=0.05)
    out.float().square().mean().backward()  # through the bf16 q/k of the attention's own backward
    attn = net.blocks[0].attn
    assert attn.qkv.weight.grad.dtype == torch.float32 and attn.qkv.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("preset", ["DiT-T/2", "DiT-T/2-2025"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_training_forward_builds_one_graph_per_patch_side(preset, checkpointed):
    """torch.compile as training uses it (``dist.compile_network``, static shapes), on the eager
    backend (graph capture only: the inductor build is test_compile_cpu's): routed forward and
    backward at two patch sides, each twice with new routes, angles and inputs, capture one
    graph per side with no graph break and no recompile."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from latent_patch.dist import compile_network

    net = _net(preset, latent_size=8, depth=3, route_ratio=0.5, route_start=1, route_end=1,
               grad_checkpointing=checkpointed)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = compile_network(net, backend="eager", num_shapes=2)
        for side, offset in ((4, 0), (8, 0), (4, 2), (8, 0)):
            x = torch.randn(2, 6, side, side)
            x[:, -2:] = coord_grid(8)[:, offset:offset + side, offset:offset + side]
            route = draw_route(2, (side // 2) ** 2, torch.Generator().manual_seed(side + offset))
            compiled(x, torch.randn(2), torch.tensor([1, 2]), route=route).square().sum().backward()
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
