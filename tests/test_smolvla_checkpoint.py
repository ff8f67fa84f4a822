"""Loading tiny SmolVLA checkpoints in LeRobot's on-disk format through the real loading code:
config, weights (compiled saves included), normaliser statistics by registry name (and the
legacy buffers, and the base checkpoint's dataset-keyed ones), the tokenizer and the prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.helpers.smolvla_checkpoints import (
    policy_config,
    tiny_model_config,
    tiny_stats,
    write_tiny_checkpoint,
    write_tiny_vlm_dir,
)
from vla_inference.models.base import ModelLoadError
from vla_inference.models.common import lerobot as lr
from vla_inference.models.common.init import init_random_weights
from vla_inference.models.smolvla import checkpoint as ckpt
from vla_inference.models.smolvla.model import SmolVLAConfig, build


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_vlm_dir(tmp_path_factory.mktemp("vlm"))


def load_model(c: ckpt.Checkpoint) -> torch.nn.Module:
    return c.load_network("cpu", torch.float32)


def expected_state(vlm_dir: Path, seed: int = 0, **changes: object) -> dict[str, torch.Tensor]:
    model = build(tiny_model_config(vlm_dir, policy_config(vlm_dir, **changes)))  # type: ignore[arg-type]
    init_random_weights(model, seed)
    return model.state_dict()


@pytest.mark.parametrize("compiled", [False, True])
def test_loads_weights_and_config(tmp_path: Path, vlm_dir: Path, compiled: bool) -> None:
    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir, seed=3, compiled=compiled)
    if compiled:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
        assert keys and all(k.startswith("model._orig_mod.") for k in keys)
    c = ckpt.load(path, tokenizer_path=str(vlm_dir))
    assert c.config.vlm.depth == 4 and c.config.chunk_size == 6 and c.backbone == str(vlm_dir / "config.json")
    assert c.features.cameras == ("observation.images.camera1", "observation.images.camera2")
    assert (c.features.state_dim, c.features.action_dim, c.features.empty_cameras) == (6, 5, 1)
    model = load_model(c)
    expected = expected_state(vlm_dir, seed=3)
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_layout_problems_are_one_error(tmp_path: Path, vlm_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.action_out_proj.weight"]
    tensors["model.surprise"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    c = ckpt.load(path, tokenizer_path=str(vlm_dir))
    with pytest.raises(
        ModelLoadError, match=r"missing 1: model\.action_out_proj\.weight.*unexpected 1: model\.surprise"
    ):
        load_model(c)


def test_statistics_found_by_registry_name(tmp_path: Path, vlm_dir: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir, normalizer_step=3)
    assert (path / "policy_preprocessor_step_3_normalizer_processor.safetensors").is_file()
    c = ckpt.load(path, tokenizer_path=str(vlm_dir))
    expected = tiny_stats(6, 5)
    state, action = c.stats(ckpt.STATE), c.stats(ckpt.ACTION)
    assert state is not None and action is not None
    np.testing.assert_array_equal(state.mean, np.float32(expected["observation.state"]["mean"]))
    np.testing.assert_array_equal(action.std, np.float32(expected["action"]["std"]))
    assert c.unnormalizer is not None and c.unnormalizer.source.endswith("unnormalizer_processor.safetensors")
    assert c.normalizer is not None and c.normalizer.eps == 1e-8
    assert c.normalizer.norm_map["STATE"] == "MEAN_STD"
    assert c.missing_stats() == [] and c.dataset_keys() == []
    assert c.mode(ckpt.STATE) == c.mode(ckpt.ACTION) == "mean_std"


def test_legacy_buffers(tmp_path: Path, vlm_dir: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir, seed=2, legacy_stats=True)
    assert not (path / lr.PREPROCESSOR).exists()
    c = ckpt.load(path, tokenizer_path=str(vlm_dir))
    state, action = c.stats(ckpt.STATE), c.stats(ckpt.ACTION)
    assert state is not None and action is not None
    np.testing.assert_array_equal(state.std, np.float32(tiny_stats(6, 5)["observation.state"]["std"]))
    np.testing.assert_array_equal(action.mean, np.float32(tiny_stats(6, 5)["action"]["mean"]))
    assert c.normalizer is not None and "normalize_* buffers" in c.normalizer.source
    assert c.unnormalizer is not None and set(c.unnormalizer.stats) == {ckpt.ACTION}
    model = load_model(c)  # the buffers are skipped as weights
    assert torch.equal(
        model.state_dict()["state_proj.weight"], expected_state(vlm_dir, seed=2)["state_proj.weight"]
    )


def test_dataset_keyed_statistics_are_detected(tmp_path: Path, vlm_dir: Path) -> None:
    """The migrated base checkpoint keeps only "<dataset>.buffer.<feature>.<stat>": LeRobot finds no
    plain statistics and silently skips normalisation; we report it and can serve a chosen key."""
    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir, dataset_keys=("so100", "so100-blue"))
    c = ckpt.load(path, tokenizer_path=str(vlm_dir))
    assert c.missing_stats() == [ckpt.STATE, ckpt.ACTION]
    assert c.dataset_keys() == ["so100", "so100-blue"]
    assert c.missing_stats("so100-blue") == []
    blue, plain = c.stats(ckpt.ACTION, "so100-blue"), tiny_stats(6, 5)["action"]["mean"]
    assert blue is not None
    np.testing.assert_allclose(blue.mean, np.float32(plain) + 1)
    assert c.missing_stats("nope") == [ckpt.STATE, ckpt.ACTION]


def test_no_statistics_at_all(tmp_path: Path, vlm_dir: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir, stats={})
    c = ckpt.load(path, tokenizer_path=str(vlm_dir))
    assert c.missing_stats() == [ckpt.STATE, ckpt.ACTION]


def test_missing_state_file_is_named(tmp_path: Path, vlm_dir: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir)
    (path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="names policy_postprocessor_step_0_unnormalizer_processor"):
        ckpt.load(path, tokenizer_path=str(vlm_dir))


def test_tokenizer_missing_is_one_line(tmp_path: Path, vlm_dir: Path) -> None:
    bare = tmp_path / "vlm"  # the backbone's config.json without its tokenizer files
    bare.mkdir()
    (bare / "config.json").write_bytes((vlm_dir / "config.json").read_bytes())
    path = write_tiny_checkpoint(tmp_path / "ckpt", bare)
    with pytest.raises(ModelLoadError) as info:
        ckpt.load(path)
    message = str(info.value)
    assert "\n" not in message and "missing tokenizer tokenizer.json" in message
    assert str(bare / "tokenizer.json") in message and "SmolVLM2-500M-Video-Instruct" in message


def test_special_token_files_missing(tmp_path: Path, vlm_dir: Path) -> None:
    lonely = tmp_path / "tok"
    lonely.mkdir()
    (lonely / "tokenizer.json").write_bytes((vlm_dir / "tokenizer.json").read_bytes())
    (lonely / "config.json").write_bytes((vlm_dir / "config.json").read_bytes())
    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir)
    with pytest.raises(ModelLoadError, match=r"missing tokenizer_config\.json and special_tokens_map\.json"):
        ckpt.load(path, tokenizer_path=str(lonely / "tokenizer.json"))


def test_named_backbone_without_a_smolvlm_config(tmp_path: Path, vlm_dir: Path) -> None:
    """vlm_model_name = the Hub id and no SmolVLM config.json here: the sizes are SIZES['smolvla_base']."""
    path = tmp_path / "ckpt"
    path.mkdir()
    config = policy_config(vlm_dir, num_vlm_layers=16, chunk_size=50, tokenizer_max_length=48)
    config["vlm_model_name"] = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    config["resize_imgs_with_padding"] = [512, 512]
    (path / "config.json").write_text(json.dumps(config))
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tok / name).write_bytes((vlm_dir / name).read_bytes())
    backbone, _ = ckpt.backbone_for(path, config, str(tok), path / "config.json")
    assert backbone.source == "SIZES['smolvla_base']" and backbone.text.depth == 32
    assert ckpt.smolvla_config(config, backbone, path / "config.json") == SmolVLAConfig.named("smolvla_base")
    config["vlm_model_name"] = "someone/other-vlm"
    with pytest.raises(ModelLoadError, match="not a known backbone"):
        ckpt.backbone_for(path, config, str(tok), path / "config.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_mode": "self_attn"}, "only cross_attn"),
        ({"add_image_special_tokens": True}, "add_image_special_tokens"),
        ({"num_expert_layers": 2}, "num_expert_layers=2"),
        ({"num_vlm_layers": 7}, "num_vlm_layers=7"),
        ({"resize_imgs_with_padding": [512, 512]}, "resize_imgs_with_padding"),
    ],
)
def test_unsupported_options_refused(vlm_dir: Path, change: dict, message: str) -> None:
    config = policy_config(vlm_dir) | change
    with pytest.raises(ModelLoadError, match=message):
        ckpt.smolvla_config(config, ckpt.read_backbone(vlm_dir / "config.json"), Path("config.json"))


# ---- the prompt ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(vlm_dir: Path) -> tuple[object, int]:
    spec = ckpt.TokenizerSpec(
        vlm_dir / "tokenizer.json", ckpt.read_pad_token(vlm_dir / "tokenizer.json"), 12, "max_length"
    )
    return ckpt.load_tokenizer(spec, 320)


@pytest.mark.parametrize(
    "task",
    [
        "pick up the red cube",
        "pick up the red cube\n",
        "stack the blocks: blue on yellow, yellow on red, then more",
        "",
    ],
)
@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_prompt_matches_transformers(
    vlm_dir: Path, tokenizer: tuple[object, int], task: str, padding: str
) -> None:
    """Our tokenisation against transformers' AutoTokenizer called as LeRobot's tokenizer step
    calls it, on the task after LeRobot's newline step."""
    tok, pad_id = tokenizer
    ids, mask = ckpt.tokenize_prompt(tok, pad_id, task, 12, padding)
    reference = transformers.AutoTokenizer.from_pretrained(str(vlm_dir))
    text = task if task.endswith("\n") else task + "\n"
    out = reference(text, max_length=12, truncation=True, padding=padding, padding_side="right")
    assert ids.tolist() == out["input_ids"] and mask.astype(int).tolist() == out["attention_mask"]
    assert pad_id == reference.pad_token_id == 2


def test_prompt_newline_and_padding(tokenizer: tuple[object, int]) -> None:
    tok, pad_id = tokenizer
    a, ma = ckpt.tokenize_prompt(tok, pad_id, "lift the lid", 12)
    b, mb = ckpt.tokenize_prompt(tok, pad_id, "lift the lid\n", 12)
    assert a.tolist() == b.tolist() and ma.tolist() == mb.tolist()  # "\n" appended once
    assert a.shape == (12,) and a.dtype == np.int64 and not ma[-1] and a[-1] == pad_id
    long, mask = ckpt.tokenize_prompt(tok, pad_id, "grasp the green bottle; open the gripper slowly " * 3, 12)
    assert mask.all() and long.shape == (12,)


def test_helper_writes_lerobots_format(tmp_path: Path, vlm_dir: Path) -> None:
    """The helper's files against the ones LeRobot 0.4.4 saved itself (tests/fixtures/smolvla):
    the same config.json fields and values, the same processor pipelines (but for the backbone path)."""
    fixture = Path(__file__).parent / "fixtures" / "smolvla" / "checkpoint"
    path = write_tiny_checkpoint(tmp_path / "ckpt", vlm_dir, num_vlm_layers=2)
    ours, theirs = (json.loads((p / "config.json").read_text()) for p in (path, fixture))
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "vlm_model_name"} == {
        k: v for k, v in theirs.items() if k != "vlm_model_name"
    }
    for name in (lr.PREPROCESSOR, lr.POSTPROCESSOR):
        mine = (path / name).read_text().replace(str(vlm_dir), "VLM")
        lerobot = (fixture / name).read_text().replace(theirs["vlm_model_name"], "VLM")
        assert json.loads(mine) == json.loads(lerobot)


def test_a_smolvlm_config_saved_by_transformers_reads_as_the_named_size(tmp_path: Path) -> None:
    """SmolVLM2-500M's sizes made by transformers and saved by it read as our named size, also
    when the nested configs leave out what equals transformers' defaults (save_pretrained's
    difference-only form: SmolVLM2's vision config then has no layer count nor MLP width)."""
    base = SmolVLAConfig.named("smolvla_base")
    vlm, vision = base.vlm, base.vision
    made = transformers.SmolVLMConfig(
        vision_config={
            "hidden_size": vision.width,
            "intermediate_size": vision.mlp_dim,
            "num_hidden_layers": vision.depth,
            "num_attention_heads": vision.num_heads,
            "patch_size": vision.patch_size,
            "image_size": vision.image_size,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": vlm.width,
            "intermediate_size": vlm.mlp_dim,
            "num_hidden_layers": 32,
            "num_attention_heads": vlm.num_heads,
            "num_key_value_heads": vlm.num_kv_heads,
            "head_dim": vlm.head_dim,
            "rms_norm_eps": 1e-5,
            "vocab_size": base.vocab_size,
            "rope_theta": 100000,
        },
        scale_factor=4,
    )
    made.save_pretrained(tmp_path / "full")
    vision_defaults = transformers.SmolVLMVisionConfig()
    text_defaults = transformers.SmolVLMConfig().text_config
    assert {k: getattr(vision_defaults, k) for k in ckpt.VISION_DEFAULTS} == ckpt.VISION_DEFAULTS
    assert {k: getattr(text_defaults, k) for k in ckpt.TEXT_DEFAULTS} == ckpt.TEXT_DEFAULTS
    full = json.loads((tmp_path / "full" / "config.json").read_text())
    diff = json.loads(json.dumps(full))
    for key, defaults in (("vision_config", vision_defaults), ("text_config", text_defaults)):
        diff[key] = {k: v for k, v in full[key].items() if getattr(defaults, k, None) != v}
    assert (
        "num_hidden_layers" not in diff["vision_config"] and "intermediate_size" not in diff["vision_config"]
    )
    (tmp_path / "diff").mkdir()
    (tmp_path / "diff" / "config.json").write_text(json.dumps(diff))
    named = ckpt.named_backbone("HuggingFaceTB/SmolVLM2-500M-Video-Instruct")
    assert named is not None
    for form in ("full", "diff"):
        backbone = ckpt.read_backbone(tmp_path / form / "config.json")
        assert (backbone.vision, backbone.text, backbone.vocab_size, backbone.scale_factor) == (
            named.vision,
            named.text,
            named.vocab_size,
            named.scale_factor,
        )
