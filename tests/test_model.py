"""ScGPT against the official scGPT outputs (tiny fixtures), and the model's options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from scgpt_train.checkpoints import load_official
from scgpt_train.model import ScGPT, ecs_loss
from scgpt_train.objectives import masked_mse

TOL = 1e-5


def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _official_dir(tmp_path: Path, sub: str, layout: str) -> Path:
    """An official checkpoint directory in the requested attention layout (released / torch / impl)."""
    src = FIXTURES / sub
    if layout == "released":
        return src
    out = tmp_path / f"{sub or 'top'}_{layout}"
    out.mkdir()
    for name in ("args.json", "vocab.json"):
        shutil.copy(src / name, out / name)
    if layout == "torch":
        shutil.copy(src / "best_model_torch_layout.pt", out / "best_model.pt")
    else:  # "impl": the 0.2.5 flash-attn names, derived from the released file
        sd = torch.load(src / "best_model.pt", weights_only=True)
        sd = {
            k.replace("self_attn.Wqkv.", "self_attn._impl.Wqkv.").replace(
                "self_attn.out_proj.", "self_attn._impl.out_proj."
            ): v
            for k, v in sd.items()
        }
        torch.save(sd, out / "best_model.pt")
    return out


def _close(ours: torch.Tensor, expected: np.ndarray, where: np.ndarray | None = None):
    a, b = ours.detach().numpy(), expected
    if where is not None:
        a, b = a[where], b[where]
    err = float(np.abs(a - b).max())
    assert err < TOL, f"max abs error {err:.3g} >= {TOL}"


@pytest.mark.parametrize("layout", ["released", "torch", "impl"])
def test_top_level_fixture_matches_official(tmp_path, layout):
    model = load_official(_official_dir(tmp_path, "", layout)).eval()
    assert model.load_report.missing == [] and model.load_report.ignored == []
    inp, exp = _npz(FIXTURES / "inputs.npz"), _npz(FIXTURES / "expected.npz")
    gene_ids = torch.from_numpy(inp["gene_ids"])
    pad_mask = torch.from_numpy(inp["src_key_padding_mask"])
    real = ~inp["src_key_padding_mask"]  # padded positions hold fast-path zeros in the official outputs
    with torch.no_grad():
        out = model(gene_ids, torch.from_numpy(inp["values"]), pad_mask)
        masked_values = torch.from_numpy(inp["values_masked"])
        masked = model(gene_ids, masked_values, pad_mask)
        gene_embs = model.gene_encoder(gene_ids)
        value_embs = model.value_encoder(torch.from_numpy(inp["values"]))
    _close(out["cell_emb"], exp["cell_emb"])
    _close(out["mvc_output"], exp["mvc_output"])
    _close(out["mlm_output"], exp["mlm_output"], real)
    _close(out["encoder_output"], exp["transformer_output"], real)
    _close(gene_embs, exp["gene_embs"])
    _close(value_embs, exp["value_embs"])
    _close(masked["cell_emb"], exp["masked_cell_emb"])
    _close(masked["mvc_output"], exp["masked_mvc_output"])
    _close(masked["mlm_output"], exp["masked_mlm_output"], real)
    positions = (masked_values == model.layout.mask_value) & ~pad_mask
    target = torch.from_numpy(inp["values"])
    for key, loss in (("mlm_output", "masked_loss_gep"), ("mvc_output", "masked_loss_gepc")):
        ours = float(masked_mse(masked[key], target, positions))  # losses are ~600: compare relatively
        assert abs(ours - float(exp[loss])) < TOL * abs(float(exp[loss])), (loss, ours, float(exp[loss]))
    # under autograd the official slow path also fills padded positions: compare everything
    out_grad = model(gene_ids, torch.from_numpy(inp["values"]), pad_mask)
    _close(out_grad["encoder_output"], exp["transformer_output_gradpath"])


def test_pad_row_is_kept_as_stored():
    sd = torch.load(FIXTURES / "best_model.pt", weights_only=True)
    model = load_official(FIXTURES)
    pad = json.loads((FIXTURES / "vocab.json").read_text())["<pad>"]
    stored = sd["encoder.embedding.weight"][pad]
    assert stored.abs().sum() > 0
    assert torch.equal(model.gene_encoder.embedding.weight[pad], stored)


@pytest.mark.parametrize("layout", ["released", "torch"])
def test_integration_fixture_matches_official(tmp_path, layout):
    model = load_official(_official_dir(tmp_path, "integration", layout)).eval()
    cfg = model.config()
    assert cfg["dsbn"] and cfg["do_dab"] and cfg["explicit_zero_prob"] and cfg["use_batch_labels"]
    inp, exp = _npz(FIXTURES / "inputs.npz"), _npz(FIXTURES / "integration" / "expected.npz")
    batch_labels = torch.from_numpy(inp["batch_labels"])
    with torch.no_grad():
        out = model(
            torch.from_numpy(inp["gene_ids"]),
            torch.from_numpy(inp["values"]),
            torch.from_numpy(inp["src_key_padding_mask"]),
            batch_labels=batch_labels,
        )
    # the official DSBN normalises the whole batch with cell 0's domain (1): only domain-1 cells agree
    rows = np.flatnonzero(inp["batch_labels"] == inp["batch_labels"][0])
    assert list(rows) == [0, 2]
    real = ~inp["src_key_padding_mask"][rows]
    for key in ("cell_emb", "dab_output"):
        _close(out[key][rows], exp[key][rows])
    for key in ("mvc_output", "mvc_zero_probs"):
        _close(out[key][rows], exp[key][rows])
    for key in ("mlm_output", "mlm_zero_probs"):
        _close(out[key][rows], exp[key][rows], real)
    _close(out["encoder_output"][rows], exp["transformer_output"][rows], real)
    assert abs(float(ecs_loss(torch.from_numpy(exp["cell_emb"]), model.ecs_threshold)) - float(exp["loss_ecs"])) < TOL


def test_perturbation_fixture_matches_official():
    """Condition tokens + affine decoder reproduce the official TransformerGenerator forward."""
    d = FIXTURES / "perturbation"
    model = load_official(d).eval()
    assert model.config()["decoder_style"] == "affine" and model.config()["n_conditions"] == 3
    inp, exp = _npz(d / "inputs.npz"), _npz(d / "expected.npz")
    pad_mask = torch.from_numpy(inp["src_key_padding_mask"])
    with torch.no_grad():
        out = model(
            torch.from_numpy(inp["gene_ids"]),
            torch.from_numpy(inp["values"]).float(),
            pad_mask,
            condition_ids=torch.from_numpy(inp["pert_flags"]).long(),
        )
    real = ~inp["src_key_padding_mask"]
    _close(out["encoder_output"], exp["transformer_output"], real)
    _close(out["mlm_output"], exp["mlm_output"], real)


def test_multiomic_fixture_matches_official():
    """Modality tokens in the official 'concat' style reproduce MultiOmicTransformerModel."""
    d = FIXTURES / "multiomic"
    model = load_official(d).eval()
    inp, exp = _npz(d / "inputs.npz"), _npz(d / "expected.npz")
    pad_mask = torch.from_numpy(inp["src_key_padding_mask"])
    with torch.no_grad():
        out = model(
            torch.from_numpy(inp["gene_ids"]),
            torch.from_numpy(inp["values"]).float(),
            pad_mask,
            batch_labels=torch.from_numpy(inp["batch_labels"]).long(),
            modality_ids=torch.from_numpy(inp["mod_types"]).long(),
        )
    real = ~inp["src_key_padding_mask"]
    _close(out["cell_emb"], exp["cell_emb"])
    _close(out["mvc_output"], exp["mvc_output"])
    _close(out["dab_output"], exp["dab_output"])
    _close(out["mlm_output"], exp["mlm_output"], real)


# ------------------------------------------------------------------------------------------ options
def _tiny(**kw) -> ScGPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, pad_token_id=0, d_model=16, n_heads=2, d_ff=32, n_layers=2, dropout=0.0)
    cfg.update(kw)
    return ScGPT(**cfg)


def _inputs(B=3, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(1, 50, (B, L), generator=g)
    values = torch.randint(0, 51, (B, L), generator=g).float()
    pad_mask = torch.zeros(B, L, dtype=torch.bool)
    pad_mask[1, 6:] = True
    pad_mask[2, 4:] = True
    gene_ids[pad_mask] = 0
    values[pad_mask] = -2.0
    return gene_ids, values, pad_mask


def test_config_roundtrip_and_hydra_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    model = _tiny(n_cls=4, norm_scheme="pre", cell_emb_style="avg-pool")
    again = ScGPT(**model.config())
    assert again.config() == model.config()
    assert [n for n, _ in again.named_parameters()] == [n for n, _ in model.named_parameters()]
    cfg = OmegaConf.create(
        {"_target_": "scgpt_train.model.ScGPT", "d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1}
    )
    built = instantiate(cfg, vocab_size=30, pad_token_id=29)
    assert built.config()["vocab_size"] == 30 and json.dumps(built.config())


@pytest.mark.parametrize("style", ["cls", "avg-pool", "w-pool"])
@pytest.mark.parametrize("norm_scheme", ["post", "pre"])
def test_cell_emb_styles_ignore_padding(style, norm_scheme):
    model = _tiny(cell_emb_style=style, norm_scheme=norm_scheme).eval()
    gene_ids, values, pad_mask = _inputs()
    out = model(gene_ids, values, pad_mask)
    # changing what sits in padded positions must not change any cell embedding
    gene_ids2, values2 = gene_ids.clone(), values.clone()
    gene_ids2[pad_mask] = 7
    values2[pad_mask] = 13.0
    out2 = model(gene_ids2, values2, pad_mask)
    torch.testing.assert_close(out["cell_emb"], out2["cell_emb"])
    if style == "avg-pool":
        h = out["encoder_output"][2, :4]
        torch.testing.assert_close(out["cell_emb"][2], h.mean(0))
    if style == "w-pool":
        torch.testing.assert_close(out["cell_emb"].norm(dim=1), torch.ones(3))
    assert (model.final_norm is not None) == (norm_scheme == "pre")


@pytest.mark.parametrize("style", ["continuous", "category", "scaling"])
def test_value_encoder_styles_train(style):
    kw = dict(layout=dict(value_style=style))
    if style == "category":
        kw["layout"].update(pad_value=51, mask_value=52)
    model = _tiny(**kw).train()
    gene_ids, values, pad_mask = _inputs()
    if style == "category":
        values[pad_mask] = 51
    if style == "scaling":
        values = values / 50
    out = model(gene_ids, values, pad_mask)
    out["mlm_output"].sum().backward()
    assert model.gene_encoder.embedding.weight.grad.abs().sum() > 0
    if style == "category":
        assert model.value_encoder.embedding.weight.shape[0] == 53
        assert model.value_encoder.embedding.weight.grad[51].abs().sum() == 0  # pad category row is frozen
    if style == "scaling":
        assert model.value_encoder is None


def test_grad_checkpointing_gives_identical_gradients():
    gene_ids, values, pad_mask = _inputs()
    gen_mask = torch.zeros_like(pad_mask)
    gen_mask[:, 2:5] = True
    grads = []
    for ckpt in (False, True):
        model = _tiny(grad_checkpointing=ckpt).train()
        out = model(gene_ids, values, pad_mask, gen_mask=gen_mask)
        (out["mlm_output"].sum() + out["mvc_output"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6)


def test_dsbn_is_per_cell():
    model = _tiny(num_batch_labels=2, dsbn=True, use_batch_labels=True)
    gene_ids, values, pad_mask = _inputs()
    labels = torch.tensor([0, 1, 0])
    # eval: each cell is normalised with its own domain's running stats, independent of the others
    with torch.no_grad():
        for bn, mean in zip(model.dsbn.bns, (0.5, -0.5), strict=True):
            bn.running_mean.fill_(mean)
    model.eval()
    out = model(gene_ids, values, pad_mask, batch_labels=labels)
    out_swapped = model(gene_ids, values, pad_mask, batch_labels=torch.tensor([0, 1, 1]))
    torch.testing.assert_close(out["cell_emb"][:2], out_swapped["cell_emb"][:2])
    assert not torch.allclose(out["cell_emb"][2], out_swapped["cell_emb"][2])
    # train: domain k's statistics come from the non-pad tokens of domain k's cells only
    model.train()
    x, _ = model.embed(gene_ids, values, pad_mask, batch_labels=labels)
    raw = model.gene_encoder(gene_ids) + model.value_encoder(values)
    sel = (labels == 0)[:, None] & ~pad_mask
    tokens = raw[sel]
    expected = (tokens - tokens.mean(0)) / torch.sqrt(tokens.var(0, unbiased=False) + 6.1e-5)
    torch.testing.assert_close(x[sel], expected, rtol=1e-4, atol=1e-4)


def test_heads_and_zero_probs():
    model = _tiny(n_cls=5, explicit_zero_prob=True, do_dab=True, num_batch_labels=3, use_batch_labels=True).eval()
    gene_ids, values, pad_mask = _inputs()
    out = model(gene_ids, values, pad_mask, batch_labels=torch.tensor([0, 2, 1]))
    assert out["cls_output"].shape == (3, 5) and out["dab_output"].shape == (3, 3)
    for key in ("mlm_zero_probs", "mvc_zero_probs"):
        assert out[key].shape == (3, 9) and bool(((out[key] > 0) & (out[key] < 1)).all())
    with pytest.raises(ValueError, match="batch_labels"):
        model(gene_ids, values, pad_mask)


def test_gradient_reversal_flips_encoder_gradient():
    model = _tiny(do_dab=True, num_batch_labels=2)
    gene_ids, values, pad_mask = _inputs()
    out = model(gene_ids, values, pad_mask)
    cell_emb = out["cell_emb"]
    cell_emb.retain_grad()
    loss = model.dab_decoder.out_layer(model.dab_decoder.hidden(cell_emb)).sum()  # no reversal
    (g_plain,) = torch.autograd.grad(loss, cell_emb, retain_graph=True)
    (g_rev,) = torch.autograd.grad(model.dab_decoder(cell_emb).sum(), cell_emb)
    torch.testing.assert_close(g_rev, -g_plain)


def test_cell_prompt_replaces_cls_input():
    model = _tiny().eval()
    gene_ids, values, pad_mask = _inputs()
    gen_mask = torch.zeros_like(pad_mask)
    gen_mask[:, 3:6] = True
    base = model(gene_ids, values, pad_mask, gen_mask=gen_mask)
    prompt = torch.randn(3, 16)
    prompted = model(gene_ids, values, pad_mask, gen_mask=gen_mask, cell_prompt=prompt)
    assert not torch.allclose(base["mlm_output"], prompted["mlm_output"])
    x, _ = model.embed(gene_ids, values, pad_mask, gen_mask=gen_mask, cell_prompt=prompt)
    torch.testing.assert_close(x[:, 0], prompt)
