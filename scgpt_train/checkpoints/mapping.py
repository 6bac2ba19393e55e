"""Pure state-dict mappings between the official scGPT layouts and ours, and args.json <-> config.

Official attention comes in three layouts (all map to our ``layers.{i}.self_attn.qkv``):
  "released": ``self_attn.Wqkv.*``            (flash-attn 1 names, the released whole-human file)
  "impl":     ``self_attn._impl.Wqkv.*`` / ``self_attn._impl.out_proj.*``   (0.2.5 with flash-attn)
  "torch":    ``self_attn.in_proj_weight`` / ``in_proj_bias`` / ``out_proj.*``   (nn.MultiheadAttention)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from data_modules.tokenize.layout import TokenLayout

ATTENTION_LAYOUTS = ("released", "impl", "torch")

# (official key, our key) templates, read both ways; first match wins. ``{n}`` is a layer / block number,
# ``{wb}`` weight or bias, ``{bn}`` a batch norm's, ``{block}`` a transformer block's weights, ``{a|b}`` one of
# the names; the placeholders stand in the same order on both sides.
# Attention keys are handled separately.
_KEY_PAIRS = [
    ("encoder.embedding.weight", "gene_encoder.embedding.weight"),
    ("encoder.enc_norm.{wb}", "gene_encoder.norm.{wb}"),
    ("flag_encoder.weight", "flag_encoder.weight"),
    ("value_encoder.{linear1|linear2}.{wb}", "value_encoder.{linear1|linear2}.{wb}"),
    ("value_encoder.embedding.weight", "value_encoder.embedding.weight"),
    ("batch_encoder.embedding.weight", "batch_encoder.embedding.weight"),
    ("batch_encoder.enc_norm.{wb}", "batch_encoder.norm.{wb}"),
    ("mod_encoder.embedding.weight", "modality_encoder.embedding.weight"),
    ("mod_encoder.enc_norm.{wb}", "modality_encoder.norm.{wb}"),
    ("pert_encoder.weight", "condition_encoder.weight"),
    ("dsbn.bns.{n}.{bn}", "dsbn.bns.{n}.{bn}"),
    ("transformer_encoder.layers.{n}.{block}.{wb}", "layers.{n}.{block}.{wb}"),
    ("transformer_encoder.norm.{wb}", "final_norm.{wb}"),  # pre-norm only: nn.TransformerEncoder(norm=...)
    ("decoder.{fc|zero_logit}.{n}.{wb}", "expr_decoder.{fc|zero_logit}.{n}.{wb}"),
    ("decoder.{coeff_decoder|bias_decoder}.fc.{n}.{wb}", "expr_decoder.{coeff_decoder|bias_decoder}.fc.{n}.{wb}"),
    ("mvc_decoder.{gene2query|W|W_zero_logit}.{wb}", "mvc_decoder.{gene2query|W|W_zero_logit}.{wb}"),
    ("cls_decoder._decoder.{n}.{wb}", "cls_decoder.hidden.{n}.{wb}"),
    ("cls_decoder.out_layer.{wb}", "cls_decoder.out_layer.{wb}"),
    ("grad_reverse_discriminator._decoder.{n}.{wb}", "dab_decoder.hidden.{n}.{wb}"),
    ("grad_reverse_discriminator.out_layer.{wb}", "dab_decoder.out_layer.{wb}"),
]
_PLACEHOLDERS = {
    "n": r"(\d+)",
    "wb": "(weight|bias)",
    "bn": "(weight|bias|running_mean|running_var|num_batches_tracked)",
    "block": "(linear1|linear2|norm1|norm2)",
}


def _rule(source: str, target: str) -> tuple[str, str]:
    """(regex matching the key template ``source``, replacement writing ``target`` with the same captures)."""
    pattern, repl = [], []
    for part in re.split(r"(\{[^}]*\})", source):
        slot = part[1:-1] if part.startswith("{") else None
        pattern.append(re.escape(part) if slot is None else _PLACEHOLDERS.get(slot, f"({slot})"))
    slots = iter(range(1, 100))
    for part in re.split(r"(\{[^}]*\})", target):
        repl.append(f"\\g<{next(slots)}>" if part.startswith("{") else part)
    return "^" + "".join(pattern) + "$", "".join(repl)


# the value encoder's norm: continuous models call it norm, category models enc_norm (official -> ours only;
# ours_to_official decides from the weights)
_OFFICIAL_TO_OURS = [(r"^value_encoder\.(?:norm|enc_norm)\.(weight|bias)$", r"value_encoder.norm.\1")] + [
    _rule(official, ours) for official, ours in _KEY_PAIRS
]
_OURS_TO_OFFICIAL = [_rule(ours, official) for official, ours in _KEY_PAIRS]
_ATTN_OFFICIAL = re.compile(
    r"^transformer_encoder\.layers\.(\d+)\.self_attn\."
    r"(?:(?:_impl\.)?Wqkv\.(?P<wqkv>weight|bias)|in_proj_(?P<inproj>weight|bias)"
    r"|(?:_impl\.)?out_proj\.(?P<out>weight|bias))$"
)

_ATTN_OURS = re.compile(r"^layers\.(\d+)\.self_attn\.(qkv|out_proj)\.(weight|bias)$")


@dataclass
class MappingReport:
    ignored: list[str] = field(default_factory=list)  # source keys with no counterpart
    missing: list[str] = field(default_factory=list)  # target keys not provided (filled by load_into)

    def summary(self) -> str:
        parts = []
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} key(s): {', '.join(self.ignored)}")
        if self.missing:
            parts.append(f"missing {len(self.missing)} key(s) (left at initialisation): {', '.join(self.missing)}")
        return "; ".join(parts) or "all keys matched"


def _rename(key: str, rules) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def detect_attention_layout(sd: dict) -> str:
    """Which of the three official attention layouts a state dict uses."""
    keys = [k for k in sd if ".self_attn." in k]
    if any("._impl." in k for k in keys):
        return "impl"
    if any(".Wqkv." in k for k in keys):
        return "released"
    if any(".in_proj_" in k for k in keys):
        return "torch"
    raise ValueError("no attention weights found (expected transformer_encoder.layers.N.self_attn.*)")


def _map_keys(sd: dict, rename) -> tuple[dict, MappingReport]:
    """``sd`` with every key renamed by ``rename(key)`` (None: ignored, reported); two keys onto one are refused."""
    out, report = {}, MappingReport()
    for key, value in sd.items():
        new = rename(key)
        if new is None:
            report.ignored.append(key)
            continue
        if new in out:
            raise ValueError(f"keys map twice onto {new!r} (mixed attention layouts?); last one: {key!r}")
        out[new] = value
    return out, report


def official_state_dict_to_ours(sd: dict) -> tuple[dict, MappingReport]:
    """Rename an official state dict (any attention layout) to our names. Values are not copied."""

    def rename(key: str) -> str | None:
        m = _ATTN_OFFICIAL.match(key)
        if m is None:
            return _rename(key, _OFFICIAL_TO_OURS)
        if m.group("out"):
            return f"layers.{m.group(1)}.self_attn.out_proj.{m.group('out')}"
        return f"layers.{m.group(1)}.self_attn.qkv.{m.group('wqkv') or m.group('inproj')}"

    return _map_keys(sd, rename)


def ours_to_official(sd: dict, layout: str = "released") -> tuple[dict, MappingReport]:
    """Rename our state dict to an official layout ("released", "impl" or "torch")."""
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"layout must be one of {ATTENTION_LAYOUTS}, got {layout!r}")
    qkv = {"released": "Wqkv.{}", "impl": "_impl.Wqkv.{}", "torch": "in_proj_{}"}[layout]
    out_proj = "_impl.out_proj.{}" if layout == "impl" else "out_proj.{}"
    value_norm = "enc_norm" if "value_encoder.embedding.weight" in sd else "norm"  # category: enc_norm

    def rename(key: str) -> str | None:
        m = _ATTN_OURS.match(key)
        if m is not None:
            layer, part, kind = m.groups()
            template = out_proj if part == "out_proj" else qkv
            return f"transformer_encoder.layers.{layer}.self_attn." + template.format(kind)
        if key.startswith("value_encoder.norm."):  # continuous: norm; category: enc_norm
            return f"value_encoder.{value_norm}.{key.rsplit('.', 1)[1]}"
        return _rename(key, _OURS_TO_OFFICIAL)

    return _map_keys(sd, rename)


# ---------------------------------------------------------------------------- args.json <-> config
def _rows(sd: dict, key: str) -> int | None:
    return int(sd[key].shape[0]) if key in sd else None


def config_from_official(args: dict, vocab: dict, sd_ours: dict) -> dict:
    """ScGPT kwargs from an official args.json + vocab + a state dict already renamed to our keys.

    Architecture sizes come from args.json; which optional modules exist comes from the weights.
    A config written by our exporter (``args["scgpt_train_config"]``) takes precedence.
    """
    if "scgpt_train_config" in args:
        return upgrade_config(args["scgpt_train_config"])
    pad_token = args.get("pad_token", "<pad>")
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} from args.json is not in vocab.json")
    for name in ("embsize", "nheads", "d_hid", "nlayers"):
        if name not in args:
            raise ValueError(f"args.json lacks the architecture field {name!r}")
    n_layers = int(args["nlayers"])
    layers_in_sd = {int(k.split(".")[1]) for k in sd_ours if k.startswith("layers.")}
    if layers_in_sd and max(layers_in_sd) + 1 != n_layers:
        raise ValueError(f"args.json says nlayers={n_layers} but the weights have {max(layers_in_sd) + 1} layers")
    num_batch = (
        _rows(sd_ours, "batch_encoder.embedding.weight")
        or _rows(sd_ours, "dab_decoder.out_layer.weight")
        or len({k.split(".")[2] for k in sd_ours if k.startswith("dsbn.bns.")})
        or 0
    )
    n_mod = _rows(sd_ours, "modality_encoder.embedding.weight") or 0
    cfg = dict(
        vocab_size=len(vocab),
        pad_token_id=int(vocab[pad_token]),
        d_model=int(args["embsize"]),
        n_heads=int(args["nheads"]),
        d_ff=int(args["d_hid"]),
        n_layers=n_layers,
        dropout=float(args.get("dropout", 0.2)),
        layout=official_layout(args),
        cell_emb_style="cls",
        norm_scheme="pre" if "final_norm.weight" in sd_ours else "post",
        use_generative="flag_encoder.weight" in sd_ours,
        use_mvc="mvc_decoder.W.weight" in sd_ours,
        explicit_zero_prob="expr_decoder.zero_logit.0.weight" in sd_ours,
        n_cls=_rows(sd_ours, "cls_decoder.out_layer.weight") or 0,
        n_layers_cls=int(args.get("n_layers_cls", 3)),
        num_batch_labels=num_batch,
        use_batch_labels="batch_encoder.embedding.weight" in sd_ours,
        dsbn=any(k.startswith("dsbn.") for k in sd_ours),
        dsbn_affine="dsbn.bns.0.weight" in sd_ours,
        do_dab="dab_decoder.out_layer.weight" in sd_ours,
        ecs_threshold=float(args.get("ecs_thres", args.get("ecs_threshold", 0.8))),
        n_conditions=_rows(sd_ours, "condition_encoder.weight") or 0,
        condition_pad_id=int(args.get("pert_pad_id", 0)),
        n_modalities=n_mod,
        modality_style="concat" if n_mod else "encoder",
        decoder_style="affine" if "expr_decoder.coeff_decoder.fc.0.weight" in sd_ours else "mlp",
    )
    return cfg


def official_layout(args: dict) -> dict:
    """The TokenLayout (as a dict) an official args.json describes. Official ``max_seq_len`` counts the
    genes (1,200 for the whole-human model); ours counts ``<cls>`` too."""
    style = args.get("input_emb_style", "continuous")
    n_bins = int(args.get("n_bins", 51) or 51)
    genes = args.get("max_seq_len")
    layout = TokenLayout(
        n_bins=n_bins,
        value_style=style,
        pad_value=float(args.get("pad_value", n_bins if style == "category" else -2)),
        mask_value=float(args.get("mask_value", n_bins + 1 if style == "category" else -1)),
        **({} if genes is None else {"max_seq_len": int(genes) + 1}),
    )
    return layout.to_dict()


# ScGPT kwargs that older checkpoints of this project stored flat; they now live in ``layout``
_LEGACY_LAYOUT_KEYS = {
    "n_bins": "n_bins",
    "input_emb_style": "value_style",
    "pad_value": "pad_value",
    "mask_value": "mask_value",
}


def upgrade_config(cfg: dict) -> dict:
    """ScGPT kwargs of any version of our checkpoints, with the token layout as one ``layout`` entry."""
    cfg = {k: v for k, v in dict(cfg).items() if k != "_target_"}
    legacy = {new: cfg.pop(old) for old, new in _LEGACY_LAYOUT_KEYS.items() if old in cfg}
    if legacy:
        cfg["layout"] = TokenLayout.from_any({**dict(cfg.get("layout") or {}), **legacy}).to_dict()
    return cfg


def official_args_from_config(cfg: dict, vocab: dict, extra: dict | None = None) -> dict:
    """args.json for an exported model: the official architecture fields + our full config."""
    pad_token = next((t for t, i in vocab.items() if i == cfg["pad_token_id"]), "<pad>")
    layout = TokenLayout.from_any(cfg.get("layout"))
    args = dict(extra or {})
    args.update(
        embsize=cfg["d_model"],
        nheads=cfg["n_heads"],
        d_hid=cfg["d_ff"],
        nlayers=cfg["n_layers"],
        dropout=cfg["dropout"],
        n_bins=layout.n_bins,
        input_emb_style=layout.value_style,
        pad_value=layout.pad_value,
        mask_value=layout.mask_value,
        max_seq_len=layout.max_genes,  # official max_seq_len counts genes; <cls> comes on top
        n_layers_cls=cfg["n_layers_cls"],
        pad_token=pad_token,
        ecs_thres=cfg["ecs_threshold"],
        explicit_zero_prob=cfg["explicit_zero_prob"],
        MVC=cfg["use_mvc"],
        DSBN=cfg["dsbn"],
        USE_GENERATIVE_TRAINING=cfg["use_generative"],
        pre_norm=cfg["norm_scheme"] == "pre",
    )
    args["scgpt_train_config"] = dict(cfg)
    return args
