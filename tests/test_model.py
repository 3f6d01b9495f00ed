import pytest
import torch

from tests.conftest import VOCAB, random_batch, tiny_config
from xlip.losses import XLIPLoss, loss_terms, total_loss
from xlip.model.layers import attend
from xlip.model.vision import VisionTransformer, load_timm_weights, patchify, unpatchify
from xlip.model.xlip import XLIPModel, add_mlm_positions


def run_losses(model, cfg, batch, seed=0):
    out = model(batch, generator=torch.Generator().manual_seed(seed))
    losses = XLIPLoss(cfg)(out, batch)
    return total_loss(losses), out, losses


@pytest.mark.parametrize("mim,mlm,stem,mode", [
    ("attention", "entity", "linear", "default"), ("random", "random", "conv", "default"),
    ("none", "entity", "linear", "default"), ("random", "none", "linear", "default"),
    ("none", "none", "linear", "default"), ("attention", "entity", "hybrid", "default"),
    ("attention", "entity", "hybrid", "fast"), ("random", "entity", "linear", "fast"),
    ("attention", "entity", "hybrid", "features"), ("random", "entity", "linear", "features"),
    ("attention", "entity", "hybrid", "tokens"), ("random", "entity", "conv", "tokens")])
def test_every_parameter_gets_a_gradient(mim, mlm, stem, mode):
    target, mask_at = "pixels", "image"
    if mode == "features":  # mim.target=features, train.mode=default
        mode, target = "default", "features"
    if mode == "tokens":  # mim.mask_at=tokens, train.mode=default
        mode, mask_at = "default", "tokens"
    cfg = tiny_config(mim={"policy": mim, "target": target, "mask_at": mask_at},
                      mlm={"policy": mlm},
                      vision={"stem": stem},
                      train={"mode": mode}, loss={"w_mim": float(mim != "none"),
                                                  "w_mlm": float(mlm != "none")})
    torch.manual_seed(0)
    model = XLIPModel(cfg, VOCAB)
    loss, out, losses = run_losses(model, cfg, random_batch(cfg))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert ("mim_loss" in losses) == (mim != "none")
    assert ("mlm_loss" in losses) == (mlm != "none")


@pytest.mark.parametrize("mode", ["default", "fast"])
def test_mim_feature_target_is_the_full_pass_and_takes_no_gradient(mode):
    """mim.target=features: the MAE decoder predicts the full-image pass's patch tokens of
    the same rows; the target is detached, so MIM's gradient reaches the encoder only through
    the visible-patch pass (the teacher side of a self-distillation)."""
    cfg = tiny_config(vision={"stem": "linear"}, mim={"target": "features"},
                      train={"mode": mode})
    torch.manual_seed(0)
    model = XLIPModel(cfg, VOCAB)
    full = []
    model.vision.register_forward_hook(
        lambda m, args, output: full.append(output) if len(args) == 1 else None)
    batch = random_batch(cfg)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert out["mim_pred"].shape == out["mim_target"].shape
    assert out["mim_target"].shape[-1] == model.vision.width
    assert torch.equal(out["mim_target"], full[0]["tokens"].detach())
    assert not out["mim_target"].requires_grad
    # MIM alone: no gradient into the full pass (in default mode CL's, with gradients),
    # but some into the vision encoder's weights, through the visible pass
    loss = XLIPLoss(cfg)(out, batch)["mim_loss"]
    tokens = full[0]["tokens"]
    if mode == "default":
        assert tokens.requires_grad
        assert torch.autograd.grad(loss, tokens, retain_graph=True, allow_unused=True) == (None,)
    weight = model.vision.blocks[0].attn.qkv.weight
    assert torch.autograd.grad(loss, weight)[0].abs().sum() > 0


def test_mim_feature_target_needs_a_full_pass():
    from xlip.config import ConfigError
    with pytest.raises(ConfigError, match="mim.target=features"):
        tiny_config(mim={"policy": "random", "target": "features"}, train={"mode": "fast"})
    with pytest.raises(ConfigError, match="mim.target"):
        tiny_config(mim={"target": "latent"})


@pytest.mark.parametrize("policy", ["attention", "random"])
def test_mim_tokens_mask_decodes_the_full_pass_kept_tokens(policy):
    """mim.mask_at=tokens: the image is encoded once; the MAE decoder gets that pass's tokens
    at exactly the kept patches (none at a masked one), and MIM's gradient reaches the encoder
    through that pass."""
    cfg = tiny_config(vision={"stem": "hybrid"}, mim={"policy": policy, "mask_at": "tokens"})
    torch.manual_seed(0)
    model = XLIPModel(cfg, VOCAB)
    passes, decoded = [], []
    model.vision.register_forward_hook(lambda m, args, output: passes.append((args, output)))
    model.mae_decoder.register_forward_hook(lambda m, args, output: decoded.append(args[0]))
    batch = random_batch(cfg)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert len(passes) == 1 and len(passes[0][0]) == 1  # one pass, over whole images
    tokens = passes[0][1]["tokens"]  # (B, N, D)
    mask = out["mim_mask"].bool()
    K = int((~mask[0]).sum())
    assert decoded[0].shape == (tokens.shape[0], K, tokens.shape[-1])
    for b in range(tokens.shape[0]):
        kept = torch.nonzero(~mask[b]).flatten()
        # the decoder's order is the keep order; as a set it is exactly the unmasked patches
        rows = [int(torch.nonzero((tokens[b] == v).all(-1)).flatten()[0]) for v in decoded[0][b]]
        assert sorted(rows) == kept.tolist()
    loss = XLIPLoss(cfg)(out, batch)["mim_loss"]
    grad = torch.autograd.grad(loss, tokens, retain_graph=True)[0]
    assert grad[~mask].abs().sum() > 0 and grad[mask].abs().sum() == 0


def test_mim_tokens_mask_config():
    from xlip.config import ConfigError
    with pytest.raises(ConfigError, match="mim.mask_at=tokens"):
        tiny_config(mim={"mask_at": "tokens"}, train={"mode": "fast"})
    with pytest.raises(ConfigError, match="mim.mask_at"):
        tiny_config(mim={"mask_at": "latent"})


def test_output_shapes(cfg):
    model = XLIPModel(cfg, VOCAB)
    batch = random_batch(cfg, B=3)
    out = model(batch)
    N = (32 // 8) ** 2
    assert out["image_embed"].shape == (3, 16) and out["text_embed"].shape == (3, 16)
    assert torch.allclose(out["image_embed"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out["mim_pred"].shape == (3, N, 64) and out["mim_mask"].shape == (3, N)
    assert out["mim_mask"].sum(1).tolist() == [N // 2] * 3
    assert out["mim_scores"].shape == (3, N)
    n_labels = int((batch["mlm_labels"] != -100).sum())
    assert out["mlm_logits"].shape == (n_labels, VOCAB)


def test_attention_scores_sum_to_number_of_guiding_tokens(cfg):
    model = XLIPModel(cfg, VOCAB)
    batch = random_batch(cfg, B=2)
    out = model(batch)
    # each guiding token spreads one unit of attention over the patches
    assert torch.allclose(out["mim_scores"].sum(1), batch["guide_mask"].sum(1).float(), atol=1e-4)


def test_masked_patches_follow_attention_scores(cfg):
    """With high_share=1 the masked patches are exactly the top half by score."""
    cfg = tiny_config(mim={"high_share": 0.999})
    model = XLIPModel(cfg, VOCAB)
    out = model(random_batch(cfg, B=2))
    for b in range(2):
        top = set(torch.argsort(out["mim_scores"][b], descending=True)[:8].tolist())
        assert set(torch.nonzero(out["mim_mask"][b]).flatten().tolist()) == top


def test_text_only_rows_skip_image_cross_attention(cfg):
    cfg = tiny_config(mlm={"text_only": True})
    model = XLIPModel(cfg, VOCAB)
    batch = random_batch(cfg, B=4)
    batch["has_image"] = torch.tensor([True, False, True, False])
    batch["images"] = batch["images"][[0, 2]]
    out = model(batch)
    assert out["image_embed"].shape[0] == 2 and out["mim_pred"].shape[0] == 2
    assert out["cl_rows"].tolist() == [0, 2]
    assert set(out["mlm_rows"].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("stem,train", [("linear", False), ("conv", False), ("hybrid", False),
                                        ("hybrid", True)])
def test_visible_forward_ignores_masked_pixels(stem, train):
    cfg = tiny_config(vision={"stem": stem}).vision
    torch.manual_seed(0)
    vit = VisionTransformer(cfg).train(train)  # train: BatchNorm uses the batch's statistics
    x = torch.randn(2, 1, 32, 32)
    keep = torch.tensor([[0, 5, 10, 15], [1, 4, 11, 14]])
    y = x.clone()
    y[0, :, 8:16, 0:8] += 5.0  # sample 0, patch 4 (row 1, col 0): masked there
    y[1, :, 0:8, 0:8] -= 3.0  # sample 1, patch 0: masked there
    a, b = vit(x, keep)["tokens"], vit(y, keep)["tokens"]
    assert torch.allclose(a, b, atol=1e-6)
    z = x.clone()
    z[0, :, 0:8, 0:8] += 5.0  # patch 0 is visible in sample 0
    assert not torch.allclose(a[0], vit(z, keep)["tokens"][0])


def test_hybrid_stem_masked_pass_leaves_batchnorm_running_stats_alone():
    vit = VisionTransformer(tiny_config(vision={"stem": "hybrid"}).vision).train()
    bn = next(m for m in vit.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(4, 1, 32, 32) * 3 + 1
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.momentum)
    vit(x, torch.tensor([[0, 5, 10, 15]] * 4))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.momentum == before[2]
    vit(x)  # the full-image pass does update them
    assert not torch.equal(bn.running_mean, before[0])


def test_hybrid_stem_tokens_follow_the_patch_grid():
    cfg = tiny_config(vision={"stem": "hybrid", "image_size": 64, "patch_size": 16}).vision
    out = VisionTransformer(cfg).eval()(torch.randn(2, 1, 64, 64))
    assert out["tokens"].shape == (2, 16, 32)


def test_patchify_roundtrip():
    x = torch.randn(2, 1, 32, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 1, 8, 8)
    assert torch.equal(p[0, 5, 0], x[0, 0, 8:16, 8:16])
    assert torch.equal(unpatchify(p.flatten(2), 8), x)


def test_explicit_and_sdpa_attention_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    assert torch.allclose(attend(q, k, v, mask, "explicit"), attend(q, k, v, mask, "sdpa"),
                          atol=1e-5)


def test_load_timm_named_weights(tmp_path):
    """A state dict with timm's ViT names (RGB, other grid, with head) loads into a 1-channel ViT."""
    from safetensors.torch import save_file

    cfg = tiny_config().vision
    src = VisionTransformer(cfg)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    rgb = state["patch_embed.proj.weight"].repeat(1, 3, 1, 1) / 3.0
    state["patch_embed.proj.weight"] = rgb
    state["head.weight"] = torch.zeros(10, 32)
    state["head.bias"] = torch.zeros(10)
    save_file(state, str(tmp_path / "vit.safetensors"))
    torch.save(state, tmp_path / "vit.pth")
    for name in ("vit.safetensors", "vit.pth"):
        dst = VisionTransformer(cfg)
        missing = load_timm_weights(dst, tmp_path / name)
        assert missing == []
        x = torch.randn(2, 1, 32, 32)
        assert torch.allclose(dst(x)["cls"], src(x)["cls"], atol=1e-5)
    # a different grid: position table resized
    big = VisionTransformer(tiny_config(vision={"image_size": 48}).vision)
    load_timm_weights(big, tmp_path / "vit.safetensors")
    assert big.pos_embed.shape == (1, 37, 32)
    with pytest.raises(ValueError, match="shapes do not match"):
        load_timm_weights(VisionTransformer(tiny_config(vision={"width": 64}).vision),
                          tmp_path / "vit.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_timm_weights(dst, tmp_path / "nope.pth")


def test_one_batch_overfit(cfg):
    """All three losses fall far on one repeated batch."""
    torch.manual_seed(0)
    model = XLIPModel(cfg, VOCAB)
    batch = random_batch(cfg, B=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(120):
        loss, out, losses = run_losses(model, cfg, batch, seed=step % 2)
        if first is None:
            first = {k: float(v.detach()) for k, v in loss_terms(losses).items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in loss_terms(losses).items()}
    assert last["cl_loss"] < 0.1 * first["cl_loss"]
    assert last["mlm_loss"] < 0.2 * first["mlm_loss"]
    assert last["mim_loss"] < 0.7 * first["mim_loss"]


def test_attmim_scores_are_the_decoders_own_cross_attention():
    """patch_scores must equal the first cross-attention's weights on a forward pass of the
    multimodal decoder over the same (unmasked) text, summed over the guiding tokens."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = XLIPModel(cfg, VOCAB).eval()
    batch = random_batch(cfg, B=3)
    dec = model.mm_decoder
    with torch.no_grad():
        text = model.text(batch["input_ids"], batch["attention_mask"])["tokens"]  # (B, L, H)
        image = model.vision(batch["images"])["tokens"]  # (B, N, D)
    for blk in dec.blocks[1:]:  # fresh init makes block 0 look like the others: perturb it
        blk.attn.qkv.weight.data.normal_()
    dec.blocks[0].attn.qkv.weight.data.normal_(std=0.5)
    captured = {}

    def hook(module, args):
        x, context = args[0], args[1]
        q, k = module.split(module.q(x)), module.split(module.k(context))
        a = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5  # (B, heads, L, N)
        captured["attn"] = a.softmax(dim=-1).mean(dim=1)

    handle = dec.blocks[0].cross.register_forward_pre_hook(hook)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        dec(text, mask, image)
    handle.remove()
    guide = batch["guide_mask"]
    expected = (captured["attn"] * guide[:, :, None]).sum(dim=1)
    got = dec.patch_scores(text, mask, guide, image)
    assert torch.allclose(got, expected, atol=1e-5)
    # the old scoring (cross-attention applied to the raw text states) differs
    old = dec.blocks[0].cross.attention_map(dec.blocks[0].norm_x(text), dec.image_proj(image))
    assert not torch.allclose(got, (old * guide[:, :, None]).sum(dim=1), atol=1e-3)
    # bf16 autocast: scores still computed in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dec.patch_scores(text, mask, guide, image)
    assert low.dtype == torch.float32 and torch.allclose(low, got, atol=1e-5)


def test_logit_scale_keeps_its_gradient_above_the_bound_and_is_clamped_after_the_step():
    import math

    cfg = tiny_config()
    torch.manual_seed(0)
    model = XLIPModel(cfg, VOCAB)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))  # above max_logit_scale=100
    loss, _, _ = run_losses(model, cfg, random_batch(cfg))
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    torch.optim.SGD([model.logit_scale], lr=0.0).step()
    model.clamp_logit_scale()
    assert math.isclose(float(model.scale().detach()), 100.0, rel_tol=1e-5)


@pytest.mark.parametrize("mim", ["attention", "random"])
def test_fast_mode_gradients_flow_only_through_the_visible_pass(mim):
    """train.mode=fast: the full-image pass (AttMIM scoring only) runs without gradients, or
    not at all with random masking; CL, MIM and MLM read one visible-patch pass."""
    cfg = tiny_config(mim={"policy": mim}, train={"mode": "fast"})
    torch.manual_seed(0)
    model = XLIPModel(cfg, VOCAB)
    passes = []

    def hook(module, args, output):
        keep = args[1] if len(args) > 1 else None
        passes.append((keep is None, output["tokens"].requires_grad))

    model.vision.register_forward_hook(hook)
    batch = random_batch(cfg)
    if mim == "attention":  # scores that do not move with the pixels: the same masks below
        fixed = torch.rand(len(batch["images"]), cfg.vision.grid ** 2,
                           generator=torch.Generator().manual_seed(1))
        model.mm_decoder.patch_scores = lambda *args: fixed
    out = model(batch, generator=torch.Generator().manual_seed(0))
    expected = [(True, False), (False, True)] if mim == "attention" else [(False, True)]
    assert passes == expected  # (full image?, with gradient?)
    assert out["image_embed"].requires_grad
    # CL's image embedding sees only visible patches: changing the masked ones leaves it
    masked = out["mim_mask"].bool()  # (B, N)
    images = batch["images"].clone()
    p = cfg.vision.patch_size
    g = cfg.vision.grid
    for b in range(images.shape[0]):
        for n in masked[b].nonzero().flatten().tolist():
            r, c = divmod(n, g)
            images[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += 3.0
    again = model(dict(batch, images=images), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["mim_mask"], out["mim_mask"])  # same masks, same generator
    assert torch.allclose(again["image_embed"], out["image_embed"], atol=1e-5)
    loss = XLIPLoss(cfg)(out, batch)
    total_loss(loss).backward()
    assert all(p.grad is not None for p in model.vision.parameters())


def test_fast_mode_with_hybrid_stem_tracks_whole_image_batchnorm_stats():
    cfg = tiny_config(mim={"policy": "random"}, vision={"stem": "hybrid"},
                      train={"mode": "fast"})
    model = XLIPModel(cfg, VOCAB).train()
    bn = next(m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    batch = random_batch(cfg)
    batch["images"] = batch["images"] * 2 + 1
    model(batch)
    with torch.no_grad():  # the first BatchNorm's input on the whole (unblanked) images
        whole = model.vision.patch_embed.stem[0](batch["images"]).mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, 0.9 * before + 0.1 * whole, atol=1e-5)


def test_one_bert_call_gives_what_two_calls_give(cfg):
    """The clean texts of image rows and the masked MLM texts share one BERT call; each row's
    states must equal those of its own call (text-only rows get no clean pass)."""
    cfg = tiny_config(text={"dropout": 0.0}, mlm={"text_only": True})
    model = XLIPModel(cfg, VOCAB).eval()
    batch = random_batch(cfg, B=4)
    batch["has_image"] = torch.tensor([True, False, True, True])
    img_rows = batch["has_image"].nonzero().squeeze(1)
    txt, mtxt = model._encode_texts(batch, img_rows)
    clean = model.text(batch["input_ids"][img_rows], batch["attention_mask"][img_rows])
    masked = model.text(batch["mlm_input_ids"], batch["mlm_attention_mask"])["tokens"]
    assert txt["tokens"].shape[0] == 3 and mtxt.shape[0] == 4
    assert torch.allclose(txt["tokens"], clean["tokens"], atol=1e-5)
    assert torch.allclose(txt["pooled"], clean["pooled"], atol=1e-5)
    assert torch.allclose(mtxt, masked, atol=1e-5)


def test_mlm_texts_cut_to_their_own_length_give_what_padded_ones_give():
    """The collator cuts the masked texts to their longest row (below the clean texts' L):
    the step then runs two BERT calls, and EntMLM's logits and every loss are those of the
    masked texts padded to L (one call)."""
    cfg = tiny_config(text={"dropout": 0.0})
    model = XLIPModel(cfg, VOCAB).train()
    short = random_batch(cfg, B=4, L=10)  # clean and masked texts alike 10 wide
    wide = dict(short)
    pad = 6
    wide["input_ids"] = torch.nn.functional.pad(short["input_ids"], (0, pad))
    wide["attention_mask"] = torch.nn.functional.pad(short["attention_mask"], (0, pad))
    wide["guide_mask"] = torch.nn.functional.pad(short["guide_mask"], (0, pad))
    cut = dict(wide)  # clean texts 16 wide, masked ones 10: two calls
    full = dict(wide)  # masked texts padded to 16 too: one call
    full["mlm_input_ids"] = torch.nn.functional.pad(short["mlm_input_ids"], (0, pad))
    full["mlm_attention_mask"] = torch.nn.functional.pad(short["mlm_attention_mask"], (0, pad))
    full["mlm_labels"] = torch.nn.functional.pad(short["mlm_labels"], (0, pad), value=-100)
    calls = []
    model.text.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    _, out_cut, parts_cut = run_losses(model, cfg, add_mlm_positions(cut))
    _, out_full, parts_full = run_losses(model, cfg, add_mlm_positions(full))
    assert calls == [(4, 16), (4, 10), (8, 16)]
    assert torch.allclose(out_cut["mlm_logits"], out_full["mlm_logits"], atol=1e-5)
    assert torch.equal(out_cut["mlm_labels"], out_full["mlm_labels"])
    for key, value in parts_full.items():
        assert torch.allclose(parts_cut[key], value, atol=1e-5), key


@pytest.mark.parametrize("mlm_length", [6, 9])
def test_clean_texts_grouped_by_length_give_what_one_padded_call_gives(mlm_length):
    """Short reports and long prompts in one batch: BERT runs per length group (the masked
    texts join the group of their length, else a call of their own), and every output, loss
    and gradient is that of one call over the texts padded to the batch's longest."""
    from xlip.data.collate import length_groups

    cfg = tiny_config(text={"dropout": 0.0}, mim={"policy": "attention"})
    model = XLIPModel(cfg, VOCAB).train()
    plain = random_batch(cfg, B=6, L=16)
    short = torch.tensor([True, False, True, True, False, True])  # rows 0, 2, 3, 5: 6 tokens
    plain["attention_mask"][short, 6:] = 0
    plain["input_ids"][plain["attention_mask"] == 0] = 0
    plain["guide_mask"] &= plain["attention_mask"].bool()
    for key in ("mlm_input_ids", "mlm_attention_mask", "mlm_labels"):  # MLM texts: cut
        plain[key] = plain[key][:, :mlm_length].clone()
    plain["mlm_attention_mask"][:] = 1
    plain = add_mlm_positions(plain)
    grouped = dict(plain)
    grouped["clean_rows"], grouped["clean_groups"] = length_groups(
        plain["attention_mask"].sum(1).tolist())
    assert grouped["clean_rows"].tolist() == [0, 2, 3, 5, 1, 4]
    assert grouped["clean_groups"] == ((4, 6), (2, 16))
    calls = []
    model.text.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    grads = []
    for batch in (plain, grouped):
        model.zero_grad()
        loss, out, parts = run_losses(model, cfg, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        if batch is plain:
            ref_out, ref_parts = out, parts
    joined = [(4 + 6, 6), (2, 16)] if mlm_length == 6 else [(4, 6), (2, 16), (6, 9)]
    assert calls[:2] == [(6, 16), (6, mlm_length)] and calls[2:] == joined
    for key in ("image_embed", "text_embed", "mim_scores", "mim_pred", "mlm_logits"):
        assert torch.allclose(out[key], ref_out[key], atol=1e-5), key
    for key, value in ref_parts.items():
        assert torch.allclose(parts[key], value, atol=1e-5), key
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-5), name


def test_hybrid_masked_pass_normalises_with_running_stats():
    """In training, the masked (visible-only) pass of the hybrid stem uses the running
    BatchNorm statistics of whole images: a visible patch's tokens do not depend on the other
    images of the batch, as they would with the blanked batch's own statistics."""
    cfg = tiny_config(vision={"stem": "hybrid"}).vision
    torch.manual_seed(0)
    vit = VisionTransformer(cfg).train()
    x = torch.randn(3, 1, 32, 32)
    vit(x)  # one full pass: running statistics of whole images
    keep = torch.tensor([[0, 5, 10, 15]] * 3)
    a = vit(x, keep)["tokens"][0]
    y = x.clone()
    y[1:] = y[1:] * 4 + 2  # other images of the batch change
    b = vit(y, keep)["tokens"][0]
    assert torch.allclose(a, b, atol=1e-5)
    vit.eval()
    assert torch.allclose(a, vit(x, keep)["tokens"][0], atol=1e-5)


def test_mim_row_fraction_masks_a_random_share_of_the_image_rows():
    """mim.row_fraction=0.25 of 8 image rows: MIM takes 2 rows (others' CL untouched), scores
    and reconstructs them as the all-rows model does, and draws other rows with another seed."""
    text = {"dropout": 0.0}  # both models in training mode must compute the same scores
    full_cfg = tiny_config(text=text)
    part_cfg = tiny_config(text=text, mim={"row_fraction": 0.25})
    torch.manual_seed(0)
    full = XLIPModel(full_cfg, VOCAB)
    part = XLIPModel(part_cfg, VOCAB)
    part.load_state_dict(full.state_dict())
    batch = random_batch(full_cfg, B=8)
    chosen = set()
    for seed in range(6):
        out = part(batch, generator=torch.Generator().manual_seed(seed))
        rows = out["mim_rows"]
        assert len(rows) == 2 and out["mim_pred"].shape[0] == 2
        assert torch.equal(out["mim_images"], batch["images"][rows])
        assert out["image_embed"].shape[0] == 8  # CL still sees every image
        ref = full(batch)
        assert torch.allclose(out["mim_scores"], ref["mim_scores"][rows], atol=1e-5)
        chosen.add(tuple(rows.tolist()))
    assert len(chosen) > 1
    XLIPLoss(part_cfg)(out, batch)["mim_loss"].backward()
    # at 1 no subset is drawn: the generator is left as it was, so masks stay as before
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert full._mim_subset(8, gen, torch.device("cpu")) == slice(None)
    assert torch.equal(gen.get_state(), state)
    part.eval()  # evaluation never subsets
    assert part._mim_subset(8, gen, torch.device("cpu")) == slice(None)


@pytest.mark.parametrize("sections", [{}, {"mim": {"mask_at": "tokens"}},
                                      {"train": {"mode": "fast"}, "mim": {"policy": "random"}}],
                         ids=["default", "tokens-mask", "fast-random"])
def test_step_without_aux_is_the_clip_step(sections):
    """``forward(aux=False)`` (the steps after ``loss.aux_until``): the outputs, loss and
    gradients of a CLIP model with the same weights; the decoders get no gradient."""
    same = {"vision": {"stem": "hybrid"}, "text": {"dropout": 0.0}}  # no random draws
    cfg = tiny_config(**same, **sections)
    clip = tiny_config(**same, mim={"policy": "none"}, mlm={"policy": "none"},
                       loss={"w_mim": 0, "w_mlm": 0})
    torch.manual_seed(0)
    model, ref = XLIPModel(cfg, VOCAB).train(), XLIPModel(clip, VOCAB).train()
    assert ref.load_state_dict(model.state_dict(), strict=False).unexpected_keys  # decoders
    batch = random_batch(cfg)
    out = model(batch, aux=False)
    want = ref(batch)
    assert sorted(out) == sorted(want)  # no MIM, no MLM outputs
    for k in ("image_embed", "text_embed"):
        torch.testing.assert_close(out[k], want[k], rtol=0, atol=0)
    loss, ref_loss = (total_loss(XLIPLoss(c)(o, batch)) for c, o in ((cfg, out), (clip, want)))
    assert set(XLIPLoss(cfg)(out, batch)) == {"cl_loss", "cl_per_sample"}
    loss.backward()
    ref_loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith(("mae_decoder.", "mm_decoder.")):
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0)
    # with aux the same model does run MIM and MLM (the test can fail)
    assert {"mim_pred", "mlm_logits"} <= set(model(batch, aux=True))
