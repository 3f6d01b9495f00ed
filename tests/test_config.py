import pytest
import yaml

from xlip.config import ConfigError, Config, from_dict, load_config, save_config


def test_defaults_validate():
    cfg = from_dict({})
    assert cfg.mim.policy == "attention" and cfg.mlm.policy == "entity"
    assert cfg.vision.resolved() == (192, 12, 3)


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"steps": 5, "warmup_steps": 1},
                                 "vision": {"preset": "small"}}))
    cfg = load_config(p, ["train.lr=3e-4", "mim.policy=random", "train.betas=[0.9, 0.95]"])
    assert cfg.train.steps == 5 and cfg.train.lr == 3e-4 and cfg.mim.policy == "random"
    assert cfg.train.betas == (0.9, 0.95) and cfg.vision.resolved()[0] == 384


def test_save_roundtrip(tmp_path):
    cfg = from_dict({"data": {"sources": [{"manifest": "m.csv", "kind": "paired"},
                                          {"manifest": "m.csv", "kind": "image_only",
                                           "weight": 0.25}]}})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again.data.sources[0].weight, float)


@pytest.mark.parametrize("overrides, match", [
    (["train.lrr=1"], r"unknown config key 'train.lrr' \(did you mean train.lr\?\)"),
    (["mim.policy=attentive"], r"mim.policy: unknown value 'attentive'; choose one of "
                               "attention, random, none"),
    (["mlm.policy=bert"], "mlm.policy: unknown value 'bert'"),
    (["train.lr="], "empty value"),
    (["train.steps=ten"], "train.steps: expected a number"),
    (["vision.image_size=100"], "not a multiple of vision.patch_size"),
    (["loss.w_mim=0"], "loss.w_mim=0 but mim.policy=attention"),
    (["mlm.min_ratio=0.6"], "mlm.min_ratio"),
    (["mlm.policy=none", "loss.w_mlm=0"], "mim.policy=attention scores patches"),
    (["bogus.key=1"], "unknown config key 'bogus'"),
    (["train.warmup_steps=2000"], "warmup_steps"),
    (["vision.stem=hybrid", "vision.patch_size=12", "vision.image_size=96"],
     "stem=hybrid needs vision.patch_size a power of two"),
    (["vision.stem=resnet"], "vision.stem: unknown value 'resnet'"),
    (["text.dropout=1.0"], r"text.dropout=1.0 must lie in \[0, 1\)"),
    (["mim.row_fraction=0"], r"mim.row_fraction=0.0 must lie in \(0, 1\]"),
    (["mlm.row_fraction=1.5"], r"mlm.row_fraction=1.5 must lie in \(0, 1\]"),
    (["train.mode=fast", "mim.row_fraction=0.5"], "train.mode=fast trains CL on the masked"),
    (["loss.aux_until=0"], r"loss.aux_until=0.0: the share of the steps that run MIM"),
    (["loss.aux_until=1.5"], r"loss.aux_until=1.5: the share"),
    (["mim.policy=none", "mlm.policy=none", "loss.w_mim=0", "loss.w_mlm=0",
      "loss.aux_until=0.5"], r"loss.aux_until=0.5 stops MIM and MLM early, but both are off"),
    (["train.adam_eps=0"], r"train.adam_eps=0.0 must be positive"),
    # silently accepted before: betas truncated to two, lr rising, no checkpoints, unused weight
    (["train.betas=[0.9, 0.98, 0.99]"], r"train.betas: expected 2 values, got 3"),
    (["train.weight_decay=-0.1"], r"train.weight_decay=-0.1 must be 0 or more"),
    (["train.min_lr_ratio=2"], r"train.min_lr_ratio=2.0 must lie in \[0, 1\]"),
    (["train.ckpt_every=-1"], r"train.ckpt_every=-1 must be positive"),
    (["mim.policy=none", "loss.w_mim=3", "mim.policy=none"],
     r"loss.w_mim=3.0 but mim.policy=none, so the weight is never used"),
    # stack traces before (a division or modulo by zero once training ran)
    (["train.log_every=0"], r"train.log_every=0 must be positive"),
    (["train.ckpt_every=0"], r"train.ckpt_every=0 must be positive"),
    (["vision.patch_size=0"], r"vision.patch_size=0 must be positive"),
    (["vision.image_size=-64"], r"vision.image_size=-64 must be positive"),
    (["train.threads=-2"], r"train.threads=-2 must be 0 or more"),
    (["data.num_workers=-1"], r"data.num_workers=-1 must be 0 or more"),
    (["train.lr=.nan"], r"train.lr=nan must be a finite number"),
    (["train.diverge_factor=.nan"], r"train.diverge_factor=nan must be a finite number"),
])
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_sections_validate_on_construction_not_only_when_loaded():
    from xlip.config import LossConfig, MIMConfig, TrainConfig

    with pytest.raises(ConfigError, match="train.betas"):
        TrainConfig(betas=(0.9, 0.98, 0.99))
    with pytest.raises(ConfigError, match="train.min_lr_ratio"):
        TrainConfig(min_lr_ratio=1.5)
    with pytest.raises(ConfigError, match="loss.w_mim=3.0 but mim.policy=none"):
        Config(mim=MIMConfig(policy="none"), loss=LossConfig(w_mim=3.0, w_mlm=1.0))
    cfg = Config()  # the defaults are valid
    cfg.train.log_every = 0  # changed after construction: validate() still catches it
    with pytest.raises(ConfigError, match="train.log_every=0"):
        cfg.validate()


def test_empty_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr:\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: config key 'train.lr' is empty"):
        load_config(p)


def test_source_validation():
    with pytest.raises(ConfigError, match=r"data.sources\[0\].kind: unknown value 'pairs'"):
        from_dict({"data": {"sources": [{"manifest": "m.csv", "kind": "pairs"}]}})
    with pytest.raises(ConfigError, match="text_only but mlm.text_only=false"):
        from_dict({"data": {"sources": [{"manifest": "m.csv", "kind": "text_only"}]}})
    with pytest.raises(ConfigError, match="manifest is empty"):
        from_dict({"data": {"sources": [{"kind": "paired"}]}})


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_clip_baseline_is_valid():
    cfg = load_config(None, ["mim.policy=none", "mlm.policy=none", "loss.w_mim=0", "loss.w_mlm=0"])
    assert isinstance(cfg, Config)


def sources(*kinds):
    return [f"data.sources=[{', '.join('{manifest: m.csv, kind: %s}' % k for k in kinds)}]"]


@pytest.mark.parametrize("overrides, match", [
    # the AttMIM scorer is trained by MLM rows with an image: text-only reports have none
    (sources("image_only", "text_only") + ["mlm.text_only=true"],
     r"mim.policy=attention scores patches .* data.sources has image_only, text_only rows"),
    # MLM switched on with nothing to mask
    (sources("image_only") + ["mim.policy=random"], "mlm.policy=entity but no row feeds MLM"),
    # no images at all
    (sources("text_only") + ["mlm.text_only=true"], "no images"),
    # the projections and the temperature would never train
    (["loss.w_cl=0"], r"loss.w_cl=0.*image_proj, text_proj"),
])
def test_switches_checked_against_the_sources(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_sources_that_train_every_switch_pass():
    load_config(None, sources("paired"))
    load_config(None, sources("image_only") + ["mlm.prompts=true"])  # prompts train the scorer
    load_config(None, sources("image_only") + ["mim.policy=random", "mlm.policy=none",
                                               "loss.w_mlm=0"])


def test_a_saved_run_config_from_before_the_unused_weight_rule_still_loads(tmp_path):
    data = load_config(None, ["mim.policy=none", "loss.w_mim=0"]).to_dict()
    data["loss"]["w_mim"] = 1.0  # what runs with mim.policy=none saved before the rule
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="loss.w_mim=1.0 but mim.policy=none"):
        load_config(tmp_path / "config.yaml")  # a config a user writes: refused
    cfg = load_config(tmp_path / "config.yaml", saved=True)  # a run's own: read as it ran
    assert cfg.mim.policy == "none" and cfg.loss.w_mim == 0.0 and cfg.loss.w_mlm == 1.0


CLIP_OFF = ["mim.policy=none", "mlm.policy=none", "loss.w_mim=0", "loss.w_mlm=0"]


@pytest.mark.parametrize("extra, match", [
    # each was silently ignored before: the run trained as if the key were not set
    (["mim.mask_at=tokens"], r"mim.policy=none, so mim.mask_at=tokens would be ignored: "
                             "remove it, or switch mim on"),
    (["mim.target=features", "mim.row_fraction=0.5"],
     r"mim.target=features, mim.row_fraction=0.5 would be ignored: remove them"),
    (["mlm.prompts=true"], r"mlm.policy=none, so mlm.prompts=True would be ignored"),
    (["mlm.text_policy=findings_impression"], r"mlm.text_policy=findings_impression would be"),
    (["mlm.row_fraction=0.25"], r"mlm.row_fraction=0.25 would be ignored"),
])
def test_options_of_a_switched_off_task_are_refused(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, CLIP_OFF + extra)
    load_config(None, extra)  # the same options with the task on (the defaults): fine


def test_norm_pix_off_with_the_feature_target_is_refused():
    with pytest.raises(ConfigError, match="mim.norm_pix=false only applies to mim.target=pixels"):
        load_config(None, ["mim.target=features", "mim.norm_pix=false"])
    load_config(None, ["mim.target=pixels", "mim.norm_pix=false"])
    load_config(None, ["mim.target=features"])


def test_switching_a_task_off_drops_its_options(tmp_path):
    from xlip.config import drop_unused_options, merge

    tuned = load_config(None, ["mim.mask_at=tokens", "mim.target=features",
                               "mlm.prompts=true", "mlm.row_fraction=0.5"]).to_dict()
    cfg = from_dict(drop_unused_options(merge(tuned, CLIP_OFF)))
    assert (cfg.mim.mask_at, cfg.mim.target, cfg.mlm.prompts, cfg.mlm.row_fraction) == \
        ("image", "pixels", False, 1.0)
    kept = from_dict(drop_unused_options(merge(tuned, [])))  # tasks on: nothing dropped
    assert (kept.mim.mask_at, kept.mlm.prompts) == ("tokens", True)
    # a run saved before the rule (its options never had an effect) still loads
    data = load_config(None, CLIP_OFF).to_dict()
    data["mim"]["mask_at"] = "tokens"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="mim.mask_at=tokens would be ignored"):
        load_config(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", saved=True).mim.mask_at == "image"
    data = load_config(None, ["mim.target=features"]).to_dict()
    data["mim"]["norm_pix"] = False  # ignored by the feature target before the rule
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "config.yaml", saved=True).mim.target == "features"
